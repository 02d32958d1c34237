"""What a model's code can run, read from its config: the linear layers LoRA can target and the
attention implementations transformers accepts for it.

The model is built from its config on torch's meta device (shapes only: no weights, no GPU, about
two seconds for a 7B model), once per config in a process. A recipe that names a layer the model
does not have, or an attention implementation its class refuses (Gemma 2 has no SDPA path in
transformers 5; flash_attention_2 needs the flash-attn package), is refused before a probe
spends minutes loading weights to find out.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from typing import Any, get_args

from autotune.errors import UsageError
from autotune.recipe import Attention, Recipe


@dataclass(frozen=True)
class Architecture:
    name: str
    """The model class, e.g. Qwen2ForCausalLM."""
    linear_names: tuple[str, ...]
    """Last names of the linear layers below the output head, sorted: what LoRA's target
    modules match (q_proj, ..., or query_key_value, dense_h_to_4h, ... in other families)."""
    attention_refusals: dict[str, str]
    """Attention implementation a recipe may name -> why this model cannot use it; those that
    work are absent."""

    def missing_targets(self, targets: str | tuple[str, ...] | None) -> tuple[str, ...]:
        """The LoRA targets that match no linear layer of the model (all-linear always works)."""
        if targets is None or targets == "all-linear":
            return ()
        return tuple(t for t in targets if t not in self.linear_names)

    def recipe_problems(self, recipe: Recipe) -> list[str]:
        """Why `recipe` cannot run on this model, one line per problem; empty when it can."""
        problems = []
        if recipe.method == "lora":
            missing = self.missing_targets(recipe.lora_target_modules)
            if missing:
                problems.append(
                    f"lora_target_modules {', '.join(missing)}: {self.name} has no such linear "
                    f"layers (its layers: {', '.join(self.linear_names)}; or use all-linear)"
                )
        refusal = self.attention_refusals.get(recipe.attention)
        if refusal:
            problems.append(f"attention {recipe.attention}: {refusal}")
        return problems


def _refusals(model: Any) -> dict[str, str]:
    name = type(model).__name__
    refusals: dict[str, str] = {}
    for implementation in get_args(Attention):
        if implementation == "sdpa" and not getattr(model, "_supports_sdpa", False):
            refusals[implementation] = (
                f"{name} has no SDPA attention in this transformers version; use eager"
            )
        elif implementation == "flash_attention_2":
            if not getattr(model, "_supports_flash_attn", False):
                refusals[implementation] = f"{name} does not support flash attention"
            elif importlib.util.find_spec("flash_attn") is None:
                refusals[implementation] = "the flash-attn package is not installed"
    return refusals


def _read(config: Any) -> Architecture:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = copy.deepcopy(config)
    config.use_cache = False
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    head = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    }
    return Architecture(type(model).__name__, tuple(sorted(names)), _refusals(model))


_READ: dict[str, Architecture | None] = {}


def read_architecture(config: Any) -> Architecture | None:
    """The architecture of a transformers config, or None where transformers cannot build the
    model from it (custom code, a family this transformers version does not know): then the
    probes are the only judge. Read once per config in a process."""
    key = config.to_json_string(use_diff=False)
    if key not in _READ:
        try:
            _READ[key] = _read(config)
        except Exception:  # noqa: BLE001 - whatever stops the build, a probe will report it
            _READ[key] = None
    return _READ[key]


def check_recipe(recipe: Recipe, config: Any, source: str) -> None:
    """Raise UsageError with what of `recipe` the model of `config` cannot run, if anything."""
    architecture = read_architecture(config)
    problems = architecture.recipe_problems(recipe) if architecture else []
    if problems:
        raise UsageError.collect(problems, source)
