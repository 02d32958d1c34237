"""What a model's code can run, read from its config: the linear layers LoRA can target, the
LoRA target sets peft accepts on it, and the attention implementations transformers accepts.

The model is built from its config on torch's meta device (shapes only: no weights, no GPU, about
two seconds for a 7B model), once per config in a process, and peft adapts a fresh one to try a
target set. A recipe that names a layer the model does not have, a target set peft refuses
(dropout on a mixture of experts' stacked weights) or an attention implementation the model's
class refuses (Gemma 2 has no SDPA path in transformers 5; flash_attention_2 needs the
flash-attn package) is refused before a probe spends minutes loading weights to find out; so
is a loss the device cannot run (Liger's fused kernel off CUDA).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.attentions import ATTENTIONS
from autotune.cuda_only import cuda_only_refusal
from autotune.errors import UsageError, first_line
from autotune.losses import LOSSES
from autotune.optimizers import optimizer_refusal
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe

if TYPE_CHECKING:
    from autotune.training.freeze import FreezeLayout


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
    linear_shapes: tuple[tuple[str, int, int], ...] = ()
    """(last name, output width, input width) of each distinct linear layer below the head:
    the layers bitsandbytes quantizes."""
    stacked_weights: bool = False
    """Whether the model holds weights that are not in linear layers but that peft may adapt
    (a mixture of experts' stacked expert weights): only then is peft asked about a target set
    whose layers are all there."""
    freeze_refusals: dict[str, str] = field(default_factory=dict)
    """train_modules of a freeze recipe -> why this model's blocks cannot train that way (its
    decoder blocks or their attention or MLP not found where autotune looks); those that work
    are absent."""
    config: Any = field(default=None, compare=False, repr=False)
    run: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    """Runs peft's check (a function and its arguments); None: in this process. A study
    passes autotune.offgpu.run_off_gpu, because peft imports bitsandbytes."""
    freeze_layout: FreezeLayout | None = field(default=None, compare=False, repr=False)
    """Where the model keeps what a freeze recipe trains, by name (None: no decoder blocks
    where autotune looks), for the exports."""

    def missing_targets(self, targets: str | tuple[str, ...] | None) -> tuple[str, ...]:
        """The LoRA targets that match no linear layer of the model (all-linear matches any)."""
        if targets is None or targets == "all-linear":
            return ()
        return tuple(t for t in targets if t not in self.linear_names)

    def lora_refusal(self, targets: str | tuple[str, ...] | None, dropout: float) -> str:
        """Why LoRA on `targets` cannot be put on this model ("" when it can): a target it
        lacks, or whatever peft refuses when it adapts the model (built on the meta device),
        e.g. dropout on the stacked expert weights that peft targets in a mixture of experts."""
        missing = self.missing_targets(targets)
        if missing:
            return (
                f"{self.name} has no {', '.join(missing)} (its linear layers: "
                f"{', '.join(self.linear_names)}; or use all-linear)"
            )
        if self.config is None or not self.stacked_weights:
            return ""
        key = (self.config.to_json_string(use_diff=False), str(targets), float(dropout))
        if key not in _PEFT_REFUSALS:
            args = (self.config, targets or "all-linear", float(dropout))
            _PEFT_REFUSALS[key] = (
                self.run(_peft_refusal, *args) if self.run else _peft_refusal(*args)
            )
        return _PEFT_REFUSALS[key]

    def quantization_refusal(self, quantization: str, device: str | None) -> str:
        """Why this model cannot run `quantization` on `device` ("" when it can): NF4 on a CPU
        whose bitsandbytes kernel refuses some of its layer widths (autotune.cpu_nf4)."""
        if quantization != "nf4" or device != "cpu":
            return ""
        from autotune.cpu_nf4 import nf4_cpu_refusal

        return nf4_cpu_refusal(self.linear_shapes)

    def recipe_problems(self, recipe: Recipe, device: str | None = None) -> list[str]:
        """Why `recipe` cannot run on this model (on `device`, where it matters), one line per
        problem; empty when it can."""
        problems = []
        refusal = self.quantization_refusal(recipe.quantization, device)
        if refusal:
            problems.append(f"quantization {recipe.quantization}: {refusal}")
        refusal = dora_refusal(recipe, device)
        if refusal:
            problems.append(refusal)
        if recipe.method == "lora":
            targets = recipe.lora_target_modules
            refusal = self.lora_refusal(targets, recipe.lora_dropout or 0.0)
            if refusal:
                shown = targets if isinstance(targets, str) else ", ".join(targets or ())
                problems.append(f"lora_target_modules {shown}: {refusal}")
        if recipe.method == "freeze" and recipe.train_modules in self.freeze_refusals:
            refusal = self.freeze_refusals[recipe.train_modules]
            problems.append(f"method freeze (train_modules {recipe.train_modules}): {refusal}")
        refusal = self.attention_refusals.get(recipe.attention, "")
        if refusal:
            problems.append(f"attention {recipe.attention}: {refusal}")
        refusal = loss_refusal(recipe.loss, device)
        if refusal:
            problems.append(f"loss {recipe.loss}: {refusal}")
        refusal = optimizer_refusal(recipe.optimizer, device)
        if refusal:
            problems.append(f"optimizer {recipe.optimizer}: {refusal}")
        return problems


def dora_refusal(recipe: Recipe, device: str | None) -> str:
    """Why DoRA over the recipe's quantized base cannot train on `device` ("" when it can, or
    when no device is named): int8 on the CPU crashes in bitsandbytes."""
    quantization = QUANTIZATIONS.get(recipe.quantization) if recipe.use_dora is True else None
    if quantization is None or device != "cpu" or not quantization.cpu_dora_refusal:
        return ""
    return (
        f"use_dora with quantization {recipe.quantization} on the CPU: "
        f"{quantization.cpu_dora_refusal}; use nf4, no quantization or no DoRA"
    )


def loss_refusal(loss: str, device: str | None) -> str:
    """Why `loss` cannot run on `device` ("" when it can, or when no device is named): Liger's
    fused linear cross-entropy is a Triton kernel, for CUDA GPUs with the liger-kernel package."""
    if not LOSSES[loss].fused or device is None:
        return ""
    return cuda_only_refusal(
        device, "Liger's fused linear cross-entropy", "liger-kernel", "liger", "loss chunked"
    )


def _refusals(model: Any) -> dict[str, str]:
    name = type(model).__name__
    refusals: dict[str, str] = {}
    for implementation in ATTENTIONS:
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


def _meta_model(config: Any) -> Any:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.use_cache = False
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _peft_refusal(config: Any, targets: str | tuple[str, ...], dropout: float) -> str:
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=8,
        lora_dropout=dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(_meta_model(config), lora)
    except Exception as error:  # noqa: BLE001 - peft's refusals are ValueError, TypeError, ...
        return f"peft refuses it: {first_line(error)}"
    return ""


_PEFT_REFUSALS: dict[tuple[str, str, float], str] = {}


def _read(config: Any, run: Callable[..., Any] | None) -> Architecture:
    import torch
    from transformers.pytorch_utils import Conv1D

    model = _meta_model(config)
    head = model.get_output_embeddings()
    shapes = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            shapes.add((last, module.out_features, module.in_features))
        elif isinstance(module, Conv1D):  # weight stored (in, out)
            shapes.add((last, module.nf, module.weight.shape[0]))
    names = {name for name, _, _ in shapes}
    stacked = any(parameter.dim() > 2 for parameter in model.parameters())
    return Architecture(
        type(model).__name__,
        tuple(sorted(names)),
        _refusals(model),
        tuple(sorted(shapes)),
        stacked,
        _freeze_refusals(model),
        config,
        run,
        _freeze_layout(model),  # last: it freezes the model's parameters
    )


def _freeze_layout(model: Any) -> FreezeLayout | None:
    from autotune.training.freeze import freeze_layout

    try:
        return freeze_layout(model)
    except (ValueError, AttributeError, NotImplementedError):  # _freeze_refusals says why
        return None


def _freeze_refusals(model: Any) -> dict[str, str]:
    """Why a freeze recipe cannot find what it freezes and trains in `model`, by train_modules."""
    from autotune.training.freeze import BLOCK_PARTS, block_part, decoder_blocks

    try:
        blocks = decoder_blocks(model)
    except ValueError as error:
        return {modules: str(error) for modules in ("all", *BLOCK_PARTS)}
    refusals = {}
    for modules in BLOCK_PARTS:
        try:
            for block in blocks:  # hybrids mix kinds of blocks
                block_part(block, modules)
        except ValueError as error:
            refusals[modules] = str(error)
    return refusals


_READ: dict[tuple[str, Any], Architecture | None] = {}


def read_architecture(config: Any, run: Callable[..., Any] | None = None) -> Architecture | None:
    """The architecture of a transformers config, or None where transformers cannot build the
    model from it (custom code, a family this transformers version does not know): then the
    probes are the only judge. Read once per config in a process; `run` runs peft's checks
    (see Architecture.run)."""
    key = (config.to_json_string(use_diff=False), run)
    if key not in _READ:
        try:
            _READ[key] = _read(config, run)
        except Exception:  # noqa: BLE001 - whatever stops the build, a probe will report it
            _READ[key] = None
    return _READ[key]


def check_recipe(recipe: Recipe, config: Any, source: str, device: str | None = None) -> None:
    """Raise UsageError with what of `recipe` the model of `config` cannot run (on `device`,
    where it matters), if anything."""
    architecture = read_architecture(config)
    problems = architecture.recipe_problems(recipe, device) if architecture else []
    if problems:
        raise UsageError.collect(problems, source)
