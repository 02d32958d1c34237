"""The search dimensions, each declared once: its name in a space file and in a trial, the
methods it applies to, which choices it accepts, and the recipe fields a choice becomes.

`SearchSpace` (space.py) and the baselines iterate `DIMENSIONS`; a new searchable value is one
entry here (and a Recipe field when it is a new one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.distributed import DISTRIBUTED, MAX_GPUS, OFFLOADS
from autotune.losses import LOSSES
from autotune.model_spec import BLOCK_LINEARS
from autotune.optimizers import OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import (
    LEFT_OUT_METHODS,
    UPPER_BOUNDS,
    Method,
    Recipe,
    TrainModules,
)

if TYPE_CHECKING:
    from autotune.model_spec import ModelSpec
    from autotune.space import SearchSpace

METHODS: tuple[str, ...] = get_args(Method)


def _integer_up_to(top: int) -> tuple[Callable[[Any], bool], str]:
    def check(choice: Any) -> bool:
        return isinstance(choice, int) and not isinstance(choice, bool) and 1 <= choice <= top

    return check, f"integers from 1 to {top}"


def _number(choice: Any) -> bool:
    return (
        isinstance(choice, (int, float)) and not isinstance(choice, bool) and math.isfinite(choice)
    )


def _same(field: str) -> Callable[[Any, SearchSpace, ModelSpec], dict[str, Any]]:
    """A choice that is the recipe field of the same name."""
    return lambda choice, space, spec: {field: choice}


def _field(field: str) -> Callable[[Recipe, SearchSpace, ModelSpec], Any]:
    return lambda recipe, space, spec: getattr(recipe, field)


@dataclass(frozen=True)
class Dimension:
    """One dimension a space file may search."""

    name: str
    """The space file's key and, unless `per_method`, the trial parameter's name."""
    to_recipe: Callable[[Any, SearchSpace, ModelSpec], dict[str, Any]]
    """The recipe fields a chosen value becomes (given the space's fixed values and the model)."""
    of_recipe: Callable[[Recipe, SearchSpace, ModelSpec], Any]
    """The value that gives a recipe (`NOT_EXPRESSIBLE` where none does): baselines, resumes."""
    methods: tuple[str, ...] = METHODS
    """The methods it applies to; under the others it is no trial parameter."""
    allowed: tuple[Any, ...] | None = None
    """A closed set of choices (None: `check` decides)."""
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    """What `check` asks, for the message that refuses a choice."""
    cast: Callable[[Any], Any] | None = None
    """How a checked choice is stored (numbers as floats)."""
    default: tuple[Any, ...] | None = None
    """The choices a space file that leaves the dimension out takes (None: it must be given)."""
    named: bool = False
    """The file maps a name to each choice's value (LoRA target sets); trials choose a name."""
    always_searched: bool = True
    """A trial parameter even with one choice (the first dimensions; studies store them so);
    otherwise a single value is fixed and only several are searched."""
    per_method: bool = False
    """The file may give each method its own choices (a mapping method -> value or list); each
    method's choices are then their own trial parameter, `<method>_<name>`."""
    applies: Callable[[dict[str, Any]], bool] | None = None
    """Given the choices made before it (by dimension name, in table order): whether it is a
    trial parameter; where it is not, it takes its first default (None: always)."""


NOT_EXPRESSIBLE = object()
"""What `Dimension.of_recipe` returns for a recipe no choice gives."""


def _lora_r(choice: Any, space: SearchSpace, spec: ModelSpec) -> dict[str, Any]:
    rank = int(choice)
    return {"lora_r": rank, "lora_alpha": int(round(rank * space.lora_alpha_over_r))}


def _target_name(recipe: Recipe, space: SearchSpace, spec: ModelSpec) -> Any:
    names = [n for n, t in space.target_sets.items() if t == recipe.lora_target_modules]
    return names[0] if names else NOT_EXPRESSIBLE


def _frozen_layers(choice: Any, space: SearchSpace, spec: ModelSpec) -> dict[str, Any]:
    from autotune.space import frozen_layer_count

    return {"frozen_layers": frozen_layer_count(spec, choice)}


def _frozen_fraction(recipe: Recipe, space: SearchSpace, spec: ModelSpec) -> Any:
    from autotune.space import frozen_layer_count

    fractions = [
        f
        for f in space.choices_of("frozen_layers_fraction")
        if frozen_layer_count(spec, f) == recipe.frozen_layers
    ]
    return fractions[0] if fractions else NOT_EXPRESSIBLE


def _micro_batch(choice: Any, space: SearchSpace, spec: ModelSpec) -> dict[str, Any]:
    size = int(choice)
    return {
        "micro_batch_size": size,
        "gradient_accumulation_steps": space.effective_batch_size // size,
    }


_rank_check, _rank_rule = _integer_up_to(UPPER_BOUNDS["lora_r"])
_micro_check, _micro_rule = _integer_up_to(UPPER_BOUNDS["micro_batch_size"])
_gpus_check, _gpus_rule = _integer_up_to(MAX_GPUS)
LORA = ("lora",)

DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("method", _same("method"), _field("method"), allowed=METHODS),
    Dimension(
        "quantization",
        _same("quantization"),
        _field("quantization"),
        methods=LORA,
        allowed=tuple(QUANTIZATIONS),
        # base weights in bitsandbytes int8 or NF4 (QLoRA)
    ),
    Dimension(
        "lora_r", _lora_r, _field("lora_r"), methods=LORA, check=_rank_check, rule=_rank_rule
    ),
    Dimension(
        "lora_target_modules",
        lambda name, space, spec: {"lora_target_modules": space.target_sets[name]},
        _target_name,
        methods=LORA,
        named=True,
    ),
    Dimension(
        "lora_dropout",
        _same("lora_dropout"),
        _field("lora_dropout"),
        methods=LORA,
        check=lambda c: _number(c) and 0 <= c < 1,
        rule="numbers in [0, 1)",
        cast=float,
        always_searched=False,
    ),
    Dimension(
        "use_dora",
        _same("use_dora"),
        _field("use_dora"),
        methods=LORA,
        allowed=(False, True),
        default=(False,),
        # studies from before the dimension hold no use_dora parameter
        always_searched=False,
    ),
    Dimension(
        "frozen_layers_fraction",
        _frozen_layers,
        _frozen_fraction,
        methods=("freeze",),
        check=lambda c: _number(c) and 0 < c < 1,
        rule="numbers in (0, 1)",
        cast=float,
    ),
    Dimension(
        "train_modules",
        _same("train_modules"),
        _field("train_modules"),
        methods=("freeze",),
        allowed=get_args(TrainModules),
        default=("all",),
        # studies from before the dimension hold no train_modules parameter
        always_searched=False,
        # what trains in the blocks above the frozen ones: all, attention or mlp
    ),
    Dimension("precision", _same("precision"), _field("precision"), allowed=tuple(PRECISIONS)),
    Dimension(
        "micro_batch_size",
        _micro_batch,
        _field("micro_batch_size"),
        check=_micro_check,
        rule=_micro_rule,
    ),
    Dimension(
        "gradient_checkpointing",
        _same("gradient_checkpointing"),
        _field("gradient_checkpointing"),
        allowed=(True, False),
    ),
    Dimension(
        "activation_offload",
        _same("activation_offload"),
        _field("activation_offload"),
        allowed=(False, True),
        default=(False,),
        always_searched=False,
    ),
    Dimension("optimizer", _same("optimizer"), _field("optimizer"), allowed=tuple(OPTIMIZERS)),
    Dimension(
        "expandable_segments",
        _same("expandable_segments"),
        _field("expandable_segments"),
        allowed=(True, False),
    ),
    Dimension(
        "attention",
        _same("attention"),
        _field("attention"),
        allowed=tuple(ATTENTIONS),
        default=("sdpa",),
    ),
    Dimension(
        "batching",
        _same("batching"),
        _field("batching"),
        allowed=tuple(BATCHINGS),
        default=("padded",),
    ),
    Dimension(
        "loss",
        _same("loss"),
        _field("loss"),
        allowed=tuple(LOSSES),
        default=("standard",),
        # studies from before the dimension hold no loss parameter: one choice stays fixed
        always_searched=False,
        # the cross-entropy over the whole micro-batch, in chunks, or Liger's fused one
    ),
    Dimension(
        "learning_rate",
        _same("learning_rate"),
        _field("learning_rate"),
        check=lambda c: _number(c) and c > 0,
        rule="positive numbers",
        cast=float,
        always_searched=False,
        per_method=True,
    ),
    # several GPUs per probe (--gpus-per-probe sets num_gpus, searched where it gives several
    # counts; one GPU is distributed none; SearchSpace.build divides the accumulation by it so
    # the effective batch stays fixed)
    *(
        Dimension(name, _same(name), _field(name), default=(default,), always_searched=False, **k)
        for name, default, k in (
            ("distributed", "none", {"allowed": tuple(DISTRIBUTED)}),
            (
                "num_gpus",
                1,
                {
                    "check": _gpus_check,
                    "rule": _gpus_rule,
                    "applies": lambda chosen: chosen.get("distributed", "none") != "none",
                },
            ),
            ("offload", "none", {"allowed": OFFLOADS}),
        )
    ),
)
DIMENSION_BY_NAME = {d.name: d for d in DIMENSIONS}

SCALAR_KEYS = ("lora_alpha_over_r", "effective_batch_size")
"""Fixed values of a space that are no dimension: they relate dimensions to recipe fields."""


def parameter_name(dimension: Dimension, method: str) -> str:
    """The trial parameter that holds `dimension`'s choice under `method`."""
    return f"{method}_{dimension.name}" if dimension.per_method else dimension.name


def check_choices(dimension: Dimension, choices: tuple[Any, ...], where: str) -> list[str]:
    """Problems with a dimension's choices, each naming `where` (the key it was read from)."""
    problems = []
    if not choices:
        problems.append(f"{where} has no choices")
    nested = [c for c in choices if isinstance(c, (list, dict))]
    if nested:  # a choice is one value; a list in a list (or a mapping) is none of them
        return [*problems, f"{where} choices must be single values, got {nested}"]
    if dimension.name == "method":
        problems += [
            f"{where} {c} is left out: {LEFT_OUT_METHODS[c]}"
            for c in choices
            if c in LEFT_OUT_METHODS
        ]
        choices = tuple(c for c in choices if c not in LEFT_OUT_METHODS)
    if dimension.allowed is not None:
        allowed = dimension.allowed
        bad = [
            c
            for c in choices
            if c not in allowed or isinstance(c, bool) != isinstance(allowed[0], bool)
        ]
        if bad:
            problems.append(f"{where} choices {bad} are not among {', '.join(map(str, allowed))}")
    if dimension.check is not None and not all(dimension.check(c) for c in choices):
        problems.append(f"{where} choices must be {dimension.rule}, got {list(choices)}")
    if len(set(choices)) != len(choices):
        problems.append(f"{where} lists a choice twice")
    return problems


def read_target_sets(value: Any) -> tuple[dict[str, str | tuple[str, ...]], list[str]]:
    """LoRA target sets: each name maps to all-linear or a list of block linears."""
    if not isinstance(value, dict) or not value:
        return {}, ["lora_target_modules must map a name to all-linear or a module list"]
    sets: dict[str, str | tuple[str, ...]] = {}
    problems = []
    for name, modules in value.items():
        if modules == "all-linear":
            sets[str(name)] = "all-linear"
        elif isinstance(modules, list) and modules and all(m in BLOCK_LINEARS for m in modules):
            sets[str(name)] = tuple(modules)
        else:
            problems.append(
                f"lora_target_modules.{name} must be all-linear or a list drawn from "
                f"{', '.join(BLOCK_LINEARS)}"
            )
    return sets, problems
