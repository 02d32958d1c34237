"""The search space: which recipes a study may try, read from a YAML file (the
shipped ones are in autotune/search_spaces/).

A space file names the choices of each dimension; `suggest` turns an Optuna trial into a Recipe
and `recipe_params` turns a Recipe back into trial parameters (for enqueued baselines).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml

from autotune.errors import UsageError, first_line
from autotune.model_spec import BLOCK_LINEARS, ModelSpec
from autotune.recipe import (
    UPPER_BOUNDS,
    Attention,
    Batching,
    Method,
    Optimizer,
    Precision,
    Quantization,
    Recipe,
)

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"
DEFAULT_SPACE = SPACES_DIR / "default.yaml"

# The trial parameter names; a space file uses the same names for its dimensions.
LIST_DIMENSIONS = {
    "method": get_args(Method),
    "quantization": get_args(Quantization),
    "precision": get_args(Precision),
    "optimizer": get_args(Optimizer),
    "lora_r": None,
    "frozen_layers_fraction": None,
    "micro_batch_size": None,
    "gradient_checkpointing": (True, False),
    "expandable_segments": (True, False),
    "attention": get_args(Attention),
    "batching": get_args(Batching),
}
SCALAR_KEYS = ("lora_alpha_over_r", "lora_dropout", "effective_batch_size")
OPTIONAL_DEFAULTS: dict[str, Any] = {"attention": ["sdpa"], "batching": ["padded"]}
"""Dimensions a space file may leave out, and the choice they then take."""
KNOWN_KEYS = set(LIST_DIMENSIONS) | set(SCALAR_KEYS) | {"lora_target_modules", "learning_rate"}
SHARED_DIMENSIONS = (
    "precision",
    "micro_batch_size",
    "gradient_checkpointing",
    "optimizer",
    "expandable_segments",
    "attention",
    "batching",
)
"""Dimensions every method has (the others depend on the method)."""


@dataclass(frozen=True)
class SearchSpace:
    method: tuple[str, ...]
    quantization: tuple[str, ...]
    precision: tuple[str, ...]
    optimizer: tuple[str, ...]
    lora_r: tuple[int, ...]
    lora_alpha_over_r: float
    lora_dropout: float
    lora_target_modules: dict[str, str | tuple[str, ...]]
    frozen_layers_fraction: tuple[float, ...]
    micro_batch_size: tuple[int, ...]
    effective_batch_size: int
    gradient_checkpointing: tuple[bool, ...]
    expandable_segments: tuple[bool, ...]
    attention: tuple[str, ...]
    batching: tuple[str, ...]
    learning_rate: dict[str, float]
    source: str = "search space"

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> SearchSpace:
        path = Path(path) if path else DEFAULT_SPACE
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"search space file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UsageError(
                f"search space file {path} cannot be read: {first_line(error)}"
            ) from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "search space") -> SearchSpace:
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a mapping of dimensions")
        problems: list[str] = []
        unknown = sorted(set(data) - KNOWN_KEYS)
        if unknown:
            problems.append(
                f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"
            )
        data = {**OPTIONAL_DEFAULTS, **data}
        missing = sorted(KNOWN_KEYS - set(data))
        if missing:
            problems.append(f"missing keys {', '.join(missing)}")
        if problems:
            raise UsageError.collect(problems, source)

        lists: dict[str, tuple[Any, ...]] = {}
        for name, allowed in LIST_DIMENSIONS.items():
            value = data[name]
            choices = tuple(value) if isinstance(value, list) else (value,)
            if not choices:
                problems.append(f"{name} has no choices")
            if allowed is not None:
                bad = [
                    c
                    for c in choices
                    if c not in allowed or isinstance(c, bool) != isinstance(allowed[0], bool)
                ]
                if bad:
                    problems.append(
                        f"{name} choices {bad} are not among {', '.join(map(str, allowed))}"
                    )
            if len(set(choices)) != len(choices):
                problems.append(f"{name} lists a choice twice")
            lists[name] = choices
        for name in ("lora_r", "micro_batch_size"):
            top = UPPER_BOUNDS[name]
            if not all(
                isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= top
                for c in lists[name]
            ):
                problems.append(
                    f"{name} choices must be integers from 1 to {top}, got {list(lists[name])}"
                )
        fractions = lists["frozen_layers_fraction"]
        if not all(isinstance(c, (int, float)) and 0 < c < 1 for c in fractions):
            problems.append(
                f"frozen_layers_fraction choices must lie in (0, 1), got {list(fractions)}"
            )

        effective = data["effective_batch_size"]
        if not isinstance(effective, int) or isinstance(effective, bool) or effective < 1:
            problems.append(f"effective_batch_size must be a positive integer, got {effective!r}")
        else:
            bad_micro = [
                m
                for m in lists["micro_batch_size"]
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
        dropout = data["lora_dropout"]
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            problems.append(f"lora_dropout must lie in [0, 1), got {dropout!r}")

        targets = data["lora_target_modules"]
        target_sets: dict[str, str | tuple[str, ...]] = {}
        if not isinstance(targets, dict) or not targets:
            problems.append("lora_target_modules must map a name to all-linear or a module list")
        else:
            for name, modules in targets.items():
                if modules == "all-linear":
                    target_sets[str(name)] = "all-linear"
                elif (
                    isinstance(modules, list)
                    and modules
                    and all(m in BLOCK_LINEARS for m in modules)
                ):
                    target_sets[str(name)] = tuple(modules)
                else:
                    problems.append(
                        f"lora_target_modules.{name} must be all-linear or a list drawn from "
                        f"{', '.join(BLOCK_LINEARS)}"
                    )
        rates = data["learning_rate"]
        learning_rate: dict[str, float] = {}
        if isinstance(rates, (int, float)) and not isinstance(rates, bool):
            rates = {m: rates for m in lists["method"]}
        if not isinstance(rates, dict):
            problems.append("learning_rate must be a number or a mapping method -> number")
        else:
            for method in lists["method"]:
                rate = rates.get(method)
                if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0:
                    problems.append(f"learning_rate.{method} must be a positive number")
                else:
                    learning_rate[str(method)] = float(rate)
        if "lora" not in lists["method"] and set(lists["quantization"]) - {"none"}:
            problems.append("quantization other than none needs method lora in the space")
        if problems:
            raise UsageError.collect(problems, source)
        return cls(
            method=lists["method"],
            quantization=lists["quantization"],
            precision=lists["precision"],
            optimizer=lists["optimizer"],
            lora_r=lists["lora_r"],
            lora_alpha_over_r=float(alpha),
            lora_dropout=float(dropout),
            lora_target_modules=target_sets,
            frozen_layers_fraction=tuple(float(f) for f in fractions),
            micro_batch_size=lists["micro_batch_size"],
            effective_batch_size=int(effective),
            gradient_checkpointing=lists["gradient_checkpointing"],
            expandable_segments=lists["expandable_segments"],
            attention=lists["attention"],
            batching=lists["batching"],
            learning_rate=learning_rate,
            source=source,
        )

    # ---- trial <-> recipe ----------------------------------------------------------------

    def build(self, params: dict[str, Any], model: str, spec: ModelSpec, seq_len: int) -> Recipe:
        """The recipe that a set of trial parameters stands for."""
        method = params["method"]
        lora: dict[str, Any] = {}
        frozen_layers = 0
        quantization: Any = "none"  # one of the space's choices, checked when it was loaded
        if method == "lora":
            rank = int(params["lora_r"])
            quantization = params["quantization"]
            lora = {
                "lora_r": rank,
                "lora_alpha": int(round(rank * self.lora_alpha_over_r)),
                "lora_dropout": self.lora_dropout,
                "lora_target_modules": self.lora_target_modules[params["lora_target_modules"]],
            }
        elif method == "freeze":
            frozen_layers = frozen_layer_count(spec, params["frozen_layers_fraction"])
        micro_batch_size = int(params["micro_batch_size"])
        return Recipe(
            model=model,
            method=method,
            quantization=quantization,
            precision=params["precision"],
            frozen_layers=frozen_layers,
            micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=self.effective_batch_size // micro_batch_size,
            gradient_checkpointing=bool(params["gradient_checkpointing"]),
            optimizer=params["optimizer"],
            learning_rate=self.learning_rate[method],
            seq_len=seq_len,
            expandable_segments=bool(params["expandable_segments"]),
            attention=params.get("attention", "sdpa"),
            batching=params.get("batching", "padded"),
            **lora,
        )

    def suggest(self, trial: Any, model: str, spec: ModelSpec, seq_len: int) -> Recipe:
        """Sample a recipe with an Optuna trial; conditional dimensions only where they apply."""
        params: dict[str, Any] = {"method": trial.suggest_categorical("method", self.method)}
        if params["method"] == "lora":
            params["quantization"] = trial.suggest_categorical("quantization", self.quantization)
            params["lora_r"] = trial.suggest_categorical("lora_r", self.lora_r)
            params["lora_target_modules"] = trial.suggest_categorical(
                "lora_target_modules", tuple(self.lora_target_modules)
            )
        elif params["method"] == "freeze":
            params["frozen_layers_fraction"] = trial.suggest_categorical(
                "frozen_layers_fraction", self.frozen_layers_fraction
            )
        for name in SHARED_DIMENSIONS:
            params[name] = trial.suggest_categorical(name, getattr(self, name))
        return self.build(params, model, spec, seq_len)

    def params_of(self, recipe: Recipe, spec: ModelSpec) -> dict[str, Any] | None:
        """Trial parameters that give `recipe`, or None when the space cannot express it."""
        params: dict[str, Any] = {
            "method": recipe.method,
            "precision": recipe.precision,
            "micro_batch_size": recipe.micro_batch_size,
            "gradient_checkpointing": recipe.gradient_checkpointing,
            "optimizer": recipe.optimizer,
            "expandable_segments": recipe.expandable_segments,
            "attention": recipe.attention,
            "batching": recipe.batching,
        }
        if recipe.method == "lora":
            names = [
                n for n, t in self.lora_target_modules.items() if t == recipe.lora_target_modules
            ]
            if not names:
                return None
            params.update(
                quantization=recipe.quantization,
                lora_r=recipe.lora_r,
                lora_target_modules=names[0],
            )
        elif recipe.method == "freeze":
            fractions = [
                f
                for f in self.frozen_layers_fraction
                if frozen_layer_count(spec, f) == recipe.frozen_layers
            ]
            if not fractions:
                return None
            params["frozen_layers_fraction"] = fractions[0]
        for name, value in params.items():
            choices = (
                tuple(self.lora_target_modules)
                if name == "lora_target_modules"
                else getattr(self, name)
            )
            if value not in choices:
                return None
        return params

    def all_params(self) -> Iterator[dict[str, Any]]:
        """Every point of the space (for bounds such as the smallest recipe's memory)."""
        shared = SHARED_DIMENSIONS
        for method in self.method:
            if method == "lora":
                specific = {
                    "quantization": self.quantization,
                    "lora_r": self.lora_r,
                    "lora_target_modules": tuple(self.lora_target_modules),
                }
            elif method == "freeze":
                specific = {"frozen_layers_fraction": self.frozen_layers_fraction}
            else:
                specific = {}
            names = list(specific) + list(shared)
            pools = list(specific.values()) + [getattr(self, n) for n in shared]
            for values in itertools.product(*pools):
                yield {"method": method, **dict(zip(names, values))}

    def choices(self) -> dict[str, list[Any]]:
        """Each searched dimension's choices (LoRA target sets by name), as JSON-ready lists."""
        names = ("method", "quantization", "lora_r", "frozen_layers_fraction")
        return {
            **{name: list(getattr(self, name)) for name in names},
            "lora_target_modules": list(self.lora_target_modules),
            **{name: list(getattr(self, name)) for name in SHARED_DIMENSIONS},
        }

    def restricted(self, keep: dict[str, list[Any]]) -> SearchSpace:
        """This space with only the choices `keep` names (in this space's order)."""
        changes: dict[str, Any] = {}
        for name, kept in keep.items():
            if name == "lora_target_modules":
                changes[name] = {k: v for k, v in self.lora_target_modules.items() if k in kept}
            else:
                changes[name] = tuple(c for c in getattr(self, name) if c in kept)
        return dataclasses.replace(self, **changes)


def frozen_layer_count(spec: ModelSpec, fraction: float) -> int:
    """Round a fraction of the decoder blocks, keeping at least one frozen and one trained."""
    if spec.num_layers < 2:
        raise UsageError(
            f"method freeze needs a model with at least 2 decoder blocks; this one has "
            f"{spec.num_layers}"
        )
    return min(max(round(fraction * spec.num_layers), 1), spec.num_layers - 1)
