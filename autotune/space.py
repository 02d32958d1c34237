"""The search space: which recipes a study may try, read from a YAML file (the
shipped ones are in autotune/search_spaces/).

A space file names the choices of each dimension; `suggest` turns an Optuna trial into a Recipe
and `params_of` turns a Recipe back into trial parameters (for enqueued baselines). What each
dimension accepts and the recipe fields it becomes are declared once, in dimensions.py.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from autotune.dimensions import (
    DIMENSIONS,
    METHODS,
    NOT_EXPRESSIBLE,
    SCALAR_KEYS,
    Dimension,
    check_choices,
    parameter_name,
    read_target_sets,
)
from autotune.errors import UsageError, first_line
from autotune.model_spec import ModelSpec
from autotune.recipe import Recipe, load_yaml

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"
DEFAULT_SPACE = SPACES_DIR / "default.yaml"


@dataclass(frozen=True)
class SearchSpace:
    """The choices of each trial parameter, and the fixed values that relate them to recipes."""

    choices_by_parameter: dict[str, tuple[Any, ...]]
    """Each dimension's choices by trial parameter name (see `parameter_name`), in the order of
    DIMENSIONS; a dimension that is not `always_searched` with one choice is a fixed value."""
    target_sets: dict[str, str | tuple[str, ...]]
    """LoRA target sets by the name trials choose."""
    lora_alpha_over_r: float
    effective_batch_size: int
    source: str = "search space"

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> SearchSpace:
        path = Path(path) if path else DEFAULT_SPACE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"search space file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(
                f"search space file {path} cannot be read: {first_line(error)}"
            ) from None
        return cls.from_dict(load_yaml(text, str(path)), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "search space") -> SearchSpace:
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a mapping of dimensions")
        known = {d.name for d in DIMENSIONS} | set(SCALAR_KEYS)
        problems: list[str] = []
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(
                f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        data = {**{d.name: list(d.default) for d in DIMENSIONS if d.default}, **data}
        missing = sorted(known - set(data))
        if missing:
            problems.append(f"missing keys {', '.join(missing)}")
        if problems:
            raise UsageError.collect(problems, source)

        target_sets, problems = read_target_sets(data["lora_target_modules"])
        chosen: dict[str, tuple[Any, ...]] = {}
        for dimension in DIMENSIONS:
            value = data[dimension.name]
            if dimension.per_method and isinstance(value, dict):
                problems += [
                    f"{dimension.name}.{key} is not a method (one of {', '.join(METHODS)})"
                    for key in value
                    if key not in METHODS
                ]
            for name, choices, where in _file_choices(dimension, data, chosen, target_sets):
                found = check_choices(dimension, choices, where)
                problems += found
                if not found and dimension.cast is not None:
                    choices = tuple(dimension.cast(c) for c in choices)
                # what later checks look up must be hashable
                chosen[name] = tuple(c for c in choices if not isinstance(c, (list, dict)))
        effective = data["effective_batch_size"]
        if not isinstance(effective, int) or isinstance(effective, bool) or effective < 1:
            problems.append(f"effective_batch_size must be a positive integer, got {effective!r}")
        else:
            bad_micro = [
                m
                for m in chosen["micro_batch_size"]
                if isinstance(m, int) and m > 0 and effective % m
            ]
            if bad_micro:
                problems.append(
                    f"micro_batch_size choices {bad_micro} do not divide effective_batch_size "
                    f"{effective} (the effective batch is fixed so quality stays comparable)"
                )
        alpha = data["lora_alpha_over_r"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
            problems.append(f"lora_alpha_over_r must be a positive number, got {alpha!r}")
        if "lora" not in chosen["method"] and set(chosen["quantization"]) - {"none"}:
            problems.append("quantization other than none needs method lora in the space")
        if problems:
            raise UsageError.collect(problems, source)
        return cls(
            choices_by_parameter=chosen,
            target_sets=target_sets,
            lora_alpha_over_r=float(alpha),
            effective_batch_size=int(effective),
            source=source,
        )

    # ---- the table, as this space has it --------------------------------------------------

    def choices_of(self, name: str) -> tuple[Any, ...]:
        """The choices of a trial parameter (a fixed value is its one choice)."""
        return self.choices_by_parameter[name]

    def searched(self, name: str) -> bool:
        return _DIMENSION_OF[name].always_searched or len(self.choices_of(name)) > 1

    def _parameters(self, method: str) -> list[tuple[str, Dimension]]:
        """The parameters (and fixed values) under `method` besides the method, table order."""
        return [
            (parameter_name(d, method), d)
            for d in DIMENSIONS
            if d.name != "method"
            and method in d.methods
            and parameter_name(d, method) in self.choices_by_parameter
        ]

    # ---- trial <-> recipe ----------------------------------------------------------------

    def _walk(
        self, method: str, value_of: Callable[[str, Dimension], Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The value of each parameter under `method`, in table order: `value_of` gives the
        searched ones that apply (given the values before them), a fixed one is its choice,
        one that does not apply its default. Returns (every value, the trial parameters)."""
        chosen: dict[str, Any] = {"method": method}  # by dimension name, for `applies`
        values: dict[str, Any] = {}
        asked: dict[str, Any] = {}
        for name, dimension in self._parameters(method):
            if dimension.applies is not None and not dimension.applies(chosen):
                assert dimension.default is not None
                value = dimension.default[0]
            elif self.searched(name):
                value = asked[name] = value_of(name, dimension)
            else:
                value = self.choices_of(name)[0]
            values[name] = chosen[dimension.name] = value
        return values, asked

    def build(self, params: dict[str, Any], model: str, spec: ModelSpec, seq_len: int) -> Recipe:
        """The recipe that a set of trial parameters stands for."""
        method = params["method"]

        def given(name: str, dimension: Dimension) -> Any:
            if name in params or dimension.default is None:
                return params[name]
            return dimension.default[0]  # a trial stored before the dimension existed

        values, _ = self._walk(method, given)
        fields: dict[str, Any] = {"method": method}
        for name, dimension in self._parameters(method):
            fields.update(dimension.to_recipe(values[name], self, spec))
        gpus = fields.get("num_gpus", 1)
        if gpus > 1:  # each GPU accumulates its share of the fixed effective batch
            per_gpu = self.effective_batch_size // gpus
            fields["gradient_accumulation_steps"] = max(per_gpu // fields["micro_batch_size"], 1)
        return Recipe(model=model, seq_len=seq_len, **fields)

    def suggest(self, trial: Any, model: str, spec: ModelSpec, seq_len: int) -> Recipe:
        """Sample a recipe with an Optuna trial; conditional dimensions only where they apply."""
        method = trial.suggest_categorical("method", self.choices_of("method"))
        _, asked = self._walk(
            method, lambda name, _: trial.suggest_categorical(name, self.choices_of(name))
        )
        return self.build({"method": method, **asked}, model, spec, seq_len)

    def params_of(self, recipe: Recipe, spec: ModelSpec) -> dict[str, Any] | None:
        """Trial parameters that give `recipe`, or None when the space cannot express it."""
        if recipe.method not in self.choices_of("method"):
            return None
        _, asked = self._walk(
            recipe.method, lambda name, dimension: dimension.of_recipe(recipe, self, spec)
        )
        if any(
            value is NOT_EXPRESSIBLE or value not in self.choices_of(name)
            for name, value in asked.items()
        ):
            return None
        return {"method": recipe.method, **asked}

    def params_like(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """A point of the space under `wanted["method"]`: `wanted`'s value where it is a choice,
        the first choice elsewhere."""

        def like(name: str, _: Dimension) -> Any:
            choices = self.choices_of(name)
            return wanted[name] if wanted.get(name) in choices else choices[0]

        _, asked = self._walk(wanted["method"], like)
        return {"method": wanted["method"], **asked}

    def all_params(self) -> Iterator[dict[str, Any]]:
        """Every point of the space (for bounds such as the smallest recipe's memory)."""
        for method in self.choices_of("method"):
            names = [n for n, _ in self._parameters(method) if self.searched(n)]
            seen: set[tuple[Any, ...]] = set()
            for values in itertools.product(*(self.choices_of(n) for n in names)):
                _, asked = self._walk(method, partial(_given, dict(zip(names, values))))
                key = tuple(asked.items())
                if key not in seen:  # a combination a dimension does not apply in repeats
                    seen.add(key)
                    yield {"method": method, **asked}

    def choices(self) -> dict[str, list[Any]]:
        """Each searched parameter's choices (LoRA target sets by name), as JSON-ready lists."""
        return {
            name: list(choices)
            for name, choices in self.choices_by_parameter.items()
            if self.searched(name)
        }

    def restricted(
        self,
        keep: dict[str, Any],
        target_sets: dict[str, str | tuple[str, ...]] | None = None,
    ) -> SearchSpace:
        """This space with only the choices `keep` names (in this space's order); with
        `target_sets`, those LoRA target sets (a name `keep` adds must be among them)."""
        sets = self.target_sets if target_sets is None else target_sets
        changed = dict(self.choices_by_parameter)
        for name, kept in keep.items():
            current = changed[name]
            added = tuple(c for c in kept if c not in current)
            changed[name] = tuple(c for c in current if c in kept) + added
        return dataclasses.replace(self, choices_by_parameter=changed, target_sets=sets)


def _file_choices(
    dimension: Dimension,
    data: dict[str, Any],
    chosen: dict[str, tuple[Any, ...]],
    target_sets: dict[str, Any],
) -> Iterator[tuple[str, tuple[Any, ...], str]]:
    """A dimension's choices as a space file gives them: (parameter, choices, the key's path);
    a `per_method` one once per method of the space (`chosen` holds the methods by then)."""
    value = data[dimension.name]
    if dimension.named:
        yield dimension.name, tuple(target_sets), dimension.name
        return
    if not dimension.per_method:
        yield dimension.name, _as_choices(value), dimension.name
        return
    for method in chosen["method"]:
        where = f"{dimension.name}.{method}"
        given = value.get(method) if isinstance(value, dict) else value
        yield (
            parameter_name(dimension, method),
            _as_choices(given) if given is not None else (),
            where,
        )


def _given(choices: dict[str, Any], name: str, dimension: Dimension) -> Any:
    return choices[name]


def _as_choices(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


_DIMENSION_OF = {
    parameter_name(d, m): d for d in DIMENSIONS for m in (METHODS if d.per_method else ("",))
}


def frozen_layer_count(spec: ModelSpec, fraction: float) -> int:
    """Round a fraction of the decoder blocks, keeping at least one frozen and one trained."""
    if spec.num_layers < 2:
        raise UsageError(
            f"method freeze needs a model with at least 2 decoder blocks; this one has "
            f"{spec.num_layers}"
        )
    return min(max(round(fraction * spec.num_layers), 1), spec.num_layers - 1)
