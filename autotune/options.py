"""The command line's options for the settings of a run: each option's help is the docstring under
the RunSettings field it sets and its default that field's default, so neither is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from functools import cache, partial
from typing import Any

import typer

from autotune.budgets import parse_budget
from autotune.distributed import format_gpu_counts, parse_gpu_counts, parse_gpu_indices
from autotune.study.settings import RunSettings
from autotune.units import format_duration, parse_duration_seconds, parse_memory_size


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, on one line (litgpt's CLI reads its help
    the same way): what Python shows beside the field is what `--help` shows."""
    [node] = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for field, after in zip(node.body, node.body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class TextForm:
    """How a field that is not written as itself on the command line is: a size, a duration, a
    list."""

    parse: Callable[[str], Any]
    format: Callable[[Any], str]


TEXT_FORMS = {
    "budget_bytes": TextForm(parse_budget, str),
    "host_budget_bytes": TextForm(partial(parse_memory_size, what="--host-budget"), str),
    "timeout_seconds": TextForm(partial(parse_duration_seconds, what="--timeout"), format_duration),
    "probe_timeout_seconds": TextForm(
        partial(parse_duration_seconds, what="--probe-timeout"), format_duration
    ),
    "gpus": TextForm(parse_gpu_indices, ",".join),
    "gpus_per_probe": TextForm(parse_gpu_counts, format_gpu_counts),
}
"""RunSettings fields given as text on the command line, by field name."""


def setting_help(name: str) -> str:
    """The help of the option for RunSettings field `name` (other commands' like options too)."""
    return field_docs(RunSettings)[name]


def setting_option(name: str, *flags: str) -> Any:
    """The option for RunSettings field `name`: required where the field has no default."""
    field = {f.name: f for f in dataclasses.fields(RunSettings)}[name]
    default: Any = ... if field.default is dataclasses.MISSING else field.default
    if name in TEXT_FORMS and default not in (..., None):
        default = TEXT_FORMS[name].format(default) or None
    return typer.Option(default, *flags, help=setting_help(name))


def settings_from_options(options: dict[str, Any], **more: Any) -> RunSettings:
    """RunSettings from the run command's options (named as the fields), text parsed (a value
    already parsed, such as a resolved budget's bytes, is kept); a text option not given leaves
    its field's default."""
    parsed = {
        name: TEXT_FORMS[name].parse(value)
        if name in TEXT_FORMS and isinstance(value, str)
        else value
        for name, value in options.items()
        if not (name in TEXT_FORMS and value is None)
    }
    return RunSettings(**parsed, **more)
