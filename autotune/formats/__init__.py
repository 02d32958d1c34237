"""A recipe in the configuration languages of other trainers: Hugging Face, axolotl, LLaMA-Factory.

Each format's module returns a plain mapping whose keys are the target's own option names;
`render` adds a comment header with what autotune measured, since those tools reject unknown keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autotune.distributed import DISTRIBUTED, launch_line
from autotune.formats.axolotl import axolotl_config
from autotune.formats.freeze import layout_or_llama, llamafactory_freeze_notes
from autotune.formats.hf import accelerate_config, hf_config
from autotune.formats.llamafactory import TEMPLATE_NOTES, llamafactory_config
from autotune.formats.trainer_keys import half_flags, trains_half_without_autocast
from autotune.losses import LOSSES
from autotune.optimizers import MAX_GRAD_NORM, OPTIMIZERS
from autotune.own_files import EXPORT_MARK
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.freeze import FreezeLayout
from autotune.training.io import measured_memory
from autotune.units import format_bytes

__all__ = [
    "EXPORT_FORMATS",
    "accelerate_config",
    "axolotl_config",
    "hf_config",
    "llamafactory_config",
    "render",
]

EXPORT_FORMATS = ("autotune", "hf", "axolotl", "llamafactory", "accelerate")
PREDICTED_FIGURES = frozenset(
    {"predicted_peak_bytes", "memory_model", "memory_margin", "predicted_fit"}
)
"""The figures a study records beside its measurements that are the memory model's."""


def _autotune_only(recipe: Recipe, fmt: str) -> list[tuple[str, str]]:
    """(key, what the exported config does instead) of each recipe key `fmt` cannot carry."""
    keys = []
    if recipe.activation_offload and fmt != "axolotl":
        keys.append(("activation_offload", "keeps the saved activations on the GPU"))
    if OPTIMIZERS[recipe.optimizer].host_states:
        keys.append((f"optimizer {recipe.optimizer}", "keeps the optimizer's states on the GPU"))
    return keys


def _axolotl_halves_weights(recipe: Recipe) -> bool:
    """axolotl's bf16/fp16 set the dtype it loads the model in (resolve_dtype): an amp_* recipe's
    fp32 weights load in half (a k-bit base's other weights autotune loads so too)."""
    return PRECISIONS[recipe.precision].autocast and QUANTIZATIONS[recipe.quantization].bits is None


AUTOCAST_REASONS = {
    ("axolotl", "bf16"): "its bfloat16, documented as without AMP, turns the Trainer's bf16 on "
    "as well",
    ("llamafactory", "bf16"): "its pure_bf16, without AMP, would train the LoRA adapters in bf16, "
    "autotune's are fp32",
    ("llamafactory", "fp16"): "it has no fp16 training without AMP, and keeps the trained weights "
    "in fp32 under it",
}
"""Why an axolotl or LLaMA-Factory export autocasts a recipe the probe trained without."""


TOOLS = {"hf": "the Trainer", "axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}
"""Each Trainer-based format's tool, as a header names it."""


def _autocast_note(recipe: Recipe, fmt: str, body: dict[str, Any]) -> str:
    """For a recipe the probe trained in half precision without autocast: why the export's
    bf16/fp16 are off, or that the tool autocasts all the same ('' elsewhere)."""
    if not trains_half_without_autocast(recipe):
        return ""
    precision = PRECISIONS[recipe.precision]
    flag = "bf16" if precision.compute_dtype == "bfloat16" else "fp16"
    dtype = precision.load_dtype(recipe.quantization != "none")
    if fmt == "hf":
        # TRL's SFTConfig takes bf16 = not fp16 where bf16 is None (_BaseConfig.__post_init__,
        # trl/trainer/base_config.py): the explicit false is what keeps autocast out
        return (
            f"{flag}: false: the weights load in {dtype} (dtype) and train so, as autotune "
            f"measured; Trainer's {flag}: true would add autocast, another peak (TRL's SFTConfig "
            "turns bf16 on where it is not given)"
        )
    if fmt == "accelerate":
        return (
            f"mixed_precision: no: the weights load in {dtype} (the hf export's dtype) and train "
            f"so, as autotune measured; {flag} would add autocast, another peak"
        )
    if body.get(flag) is not True:  # axolotl's float16, LLaMA-Factory's pure_bf16: no autocast
        return ""
    return (
        f"precision {recipe.precision}: {TOOLS[fmt]} runs the forward under {flag} autocast "
        f"({flag}: true; {AUTOCAST_REASONS[fmt, flag]}), which autotune did not measure: its "
        "peak, speed and loss may differ"
    )


def _clipping_note(fmt: str) -> str:
    """That the export turns gradient clipping off, as autotune trains, where the Trainer-based
    tools clip at 1.0 unless told."""
    if fmt == "accelerate":
        return (
            "no gradient clipping, as autotune trained: give the launched script's Trainer "
            f"max_grad_norm: {MAX_GRAD_NORM} (the hf export's; its default 1.0 clips)"
        )
    return (
        f"max_grad_norm: {MAX_GRAD_NORM}: no gradient clipping, as autotune trained; "
        f"{TOOLS[fmt]}'s default 1.0 would clip the gradients: another update, another loss curve"
    )


def _figure_words(key: str, value: Any) -> str:
    """A recorded figure as people read it in a comment: sizes in MiB/GiB, the margin as a
    share ("peak_memory: 121.9 MiB", "memory_margin: 17.4%"); the autotune format keeps the
    bytes, for tools."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and key.endswith("_bytes"):
        return f"{key.removesuffix('_bytes')}: {format_bytes(value)}"
    if number and key == "memory_margin":
        return f"{key}: {value:.1%}"
    return f"{key}: {value}"


def render(
    fmt: str,
    recipe: Recipe,
    measured: dict[str, Any] | None,
    *,
    data_path: str | None = None,
    data_format: str = "alpaca",
    num_layers: int | None = None,
    data_formats: dict[str, int] | None = None,
    tied_head: bool | None = None,
    freeze_layout: FreezeLayout | None = None,
) -> str:
    """The recipe as YAML in `fmt`; measured figures as YAML (autotune) or a comment header.
    `data_formats` (rows per format) says where axolotl's one format cannot read every row;
    `freeze_layout` where the model keeps what a freeze recipe trains (None: not recorded, the
    Llama family's assumed, with `tied_head` whether its output head is its input embedding,
    None: not known)."""
    if fmt == "autotune":
        return recipe.to_yaml(measured=measured)
    if fmt == "hf":
        body = hf_config(
            recipe, freeze_layout=freeze_layout, num_layers=num_layers, tied_head=tied_head
        )
    elif fmt == "axolotl":
        body = axolotl_config(
            recipe,
            data_path,
            data_format,
            num_layers,
            freeze_layout=freeze_layout,
            tied_head=tied_head,
        )
    elif fmt == "accelerate":
        body = accelerate_config(recipe)
    else:
        body = llamafactory_config(
            recipe,
            num_layers,
            tied_head=tied_head,
            freeze_layout=freeze_layout,
            data_format=data_format,
        )
    header = [f"# {recipe.label()} — {EXPORT_MARK}{fmt} format)"]
    measured = measured or {}
    for key, value in measured.items():
        if isinstance(value, dict):
            if "verdict" in value:  # the confirmation, perhaps of one that stood in
                stood_in = value.get("in_place_of")  # for a trial that left the frontier
                as_pick = f" (in place of trial {stood_in} as the {value.get('pick')} pick)"
                header.append(
                    f"# {key}: {value['verdict']}{as_pick if stood_in is not None else ''}"
                )
            continue
        # the study's record holds the memory model's prediction beside what was measured, and
        # how the pick chose where the measured noise decided it
        kind = "" if key in PREDICTED_FIGURES or key == "pick" else "measured "
        words = _figure_words(key, value)
        if key == "peak_memory_bytes":  # a CPU probe's is its RSS growth, and says so
            words = f"peak_memory: {measured_memory(value, measured.get('memory_source', ''))}"
        header.append(f"# {kind}{words}")
    # a launch's accelerate config must not bring the autocast the flags leave out: an fp32
    # recipe's as much as a half one's (the Trainer takes the config's where both are off)
    flags = body.get("training_arguments", body)
    plain = not (flags.get("bf16") or flags.get("fp16"))
    launch = launch_line(recipe, fmt, "no" if plain else None)
    if launch:
        header.append(f"# on {recipe.num_gpus} GPUs: {launch}")
    if fmt == "axolotl" and len(data_formats or {}) > 1:
        mix = ", ".join(f"{kind} {rows}" for kind, rows in sorted((data_formats or {}).items()))
        header.append(
            f"# the data mixes formats ({mix}); an axolotl dataset has one, and this names "
            f"{data_format}, its first row's: give axolotl one file per format"
        )
    if fmt == "axolotl" and data_format == "chat":
        header.append(
            "# chat rows: axolotl's train_on_eos trains the tokenizer's eos token; where the "
            "template ends a turn with another token (<|im_end|> of ChatML on a base model), "
            'add eot_tokens: ["<|im_end|>"] so that the end of turn is trained, as autotune does'
        )
    if fmt in LOSSES[recipe.loss].autotune_only_in:
        header.append(
            f"# loss {recipe.loss} is autotune-only: {fmt} has no equivalent, so this config "
            "trains with the standard loss and more memory (autotune train runs the recipe as "
            "it is)"
        )
    for key, instead in _autotune_only(recipe, fmt):
        header.append(
            f"# {key} is autotune-only: {fmt} has no equivalent, so this config {instead} and "
            "needs more GPU memory (autotune train runs the recipe as it is)"
        )
    if fmt == "axolotl" and _axolotl_halves_weights(recipe):
        precision = PRECISIONS[recipe.precision]
        flag = "bf16" if half_flags(recipe)["bf16"] else "fp16"
        header.append(
            f"# precision {recipe.precision}: axolotl loads the weights in "
            f"{precision.compute_dtype} ({flag}: true sets its model dtype; it has no key for "
            f"{precision.weight_dtype} weights under autocast), less memory than autotune measured"
        )
    header.append(f"# {_clipping_note(fmt)}")
    autocast_note = _autocast_note(recipe, fmt, body)
    if autocast_note:
        header.append(f"# {autocast_note}")
    if PRECISIONS[recipe.precision].autocast and DISTRIBUTED[recipe.distributed].uses_deepspeed:
        # DeepSpeed casts the model to bf16 in its bf16 mode (DeepSpeedEngine's
        # _configure_distributed_model); the probe runs it in fp32 under autocast
        header.append(
            f"# precision {recipe.precision} with {recipe.distributed}: bf16 runs DeepSpeed's bf16 "
            "mode (bf16 weights, fp32 master weights in its optimizer), not the autocast over "
            "fp32 weights autotune measured"
        )
    if fmt in ("hf", "axolotl") and recipe.method == "freeze" and freeze_layout is None:
        header.append(
            "# the study did not record where the model keeps its blocks: the trained parameters "
            "are named as the Llama family names them (model.layers.N.self_attn / .mlp); check "
            "them against the model's named_parameters()"
        )
    if fmt == "llamafactory" and recipe.method == "freeze":
        layout = layout_or_llama(recipe, freeze_layout, num_layers, tied_head)
        header += llamafactory_freeze_notes(layout, freeze_layout is None and tied_head is None)
    if fmt == "llamafactory" and data_format in TEMPLATE_NOTES:
        header.append(f"# {TEMPLATE_NOTES[data_format]}")
    if fmt == "llamafactory":
        header.append(
            f"# register dataset {body['dataset']!r} in data/dataset_info.json "
            f"pointing at {Path(data_path).name if data_path else 'your JSONL file'}"
        )
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
