"""The memory model against real CPU steps, family by family: what autotune does with each.

    python bench/replay_families.py [--families llama,gpt2] [--out bench/results/x.json]

For each causal-LM family transformers ships that users fine-tune, a tiny random model is built
from a config (2 blocks, width 128, MLP 256, 4 heads, 2 KV heads where the family has them,
vocabulary 4096, the demo tokenizer, dropout 0), and for each recipe (LoRA all-linear, full,
freeze, all of the block above the frozen one or its attention; gradient checkpointing on
and off; full under amp_bf16; QLoRA NF4; two sequences of 128 tokens, eager
attention, whose CPU kernels allocate as CUDA's do):
- the checks a study and `train` run before loading weights (the recipe against the model's
  config, its layers, peft and the device: autotune.model_spec, autotune.architecture); a
  refusal is recorded with the line the user gets;
- the real step on the CPU, every storage traced (autotune.step_trace);
- the replay (autotune.replay), and the formula (autotune.memory), allocated bytes of each over
  the traced peak. The formula answers only where the replay cannot run; its ratio is shown
  for every recipe.
A crash (a traceback where one line or a run was due) is a defect. The table ends with the
counts: refused, crashed, under-predicted (replay below the traced peak by more than the 0.5%
the replay's 512-byte rounding allows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import TOKENIZER, write_results  # noqa: E402

from autotune.random_model import CPU_WIDTHS, width_fields  # noqa: E402
from autotune.step_trace import REPLAY_TOLERANCE, under_traced  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, VOCAB = (
    CPU_WIDTHS[k] for k in ("hidden", "intermediate", "heads", "vocab")
)
SEQ_LEN = 128
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SIZES = {**width_fields(CPU_WIDTHS), "max_position_embeddings": 2 * SEQ_LEN, **SPECIAL_TOKENS}
HEAD_DIM = {"head_dim": HIDDEN // HEADS}
NO_DROPOUT = {"attention_dropout": 0.0, "hidden_dropout": 0.0}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": HEAD_DIM,
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
    },
    "qwen3_moe": {
        **HEAD_DIM,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gemma": HEAD_DIM,
    "gemma2": {**HEAD_DIM, "query_pre_attn_scalar": HIDDEN // HEADS, "sliding_window": 64},
    "gemma3_text": {**HEAD_DIM, "query_pre_attn_scalar": HIDDEN // HEADS, "sliding_window": 64},
    "gemma3": {
        "text_config": "gemma3_text",
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        "mm_tokens_per_image": 4,
        **{f"{token}_index": VOCAB - n for n, token in enumerate(("image_token", "boi_token"), 1)},
        "eoi_token_index": VOCAB - 3,
    },
    "phi": {"resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "phi3": {"resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "olmo2": {},
    "gpt_neox": {},
    "gpt2": {
        "n_inner": INTERMEDIATE,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    "falcon": {"ffn_hidden_size": INTERMEDIATE},
    "starcoder2": {"residual_dropout": 0.0, "embedding_dropout": 0.0},
    "granite": {},
    "cohere": {},
    "stablelm": {},
    "smollm3": {},
    "gpt_oss": {**HEAD_DIM, "num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {
        "num_key_value_heads": HEADS,  # multi-head latent attention: a key per query head
        "moe_intermediate_size": 64,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 32,
    },
    # hybrids: linear attention, short convolutions, Mamba mixers (their CUDA kernels are
    # optional packages; without them transformers runs reference PyTorch code, as here)
    "qwen3_next": {
        **HEAD_DIM,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 128,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_ff_dim": INTERMEDIATE},
    "falcon_h1": {
        **HEAD_DIM,
        "mamba_d_ssm": HIDDEN,
        "mamba_n_heads": HEADS,
        "mamba_d_head": HIDDEN // HEADS,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
        "mamba_chunk_size": 64,
    },
}
"""Model type -> what its config needs beyond SIZES to be a tiny model of its family (head
widths where the family's default is a real model's, experts, dropout off)."""

STEP = {"attention": "eager", "micro_batch_size": 2, "gradient_accumulation_steps": 1}
LORA = {"method": "lora", "lora_r": 8, "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
RECIPES: dict[str, dict[str, Any]] = {
    "lora gc": {**LORA, "gradient_checkpointing": True},
    "lora": {**LORA, "gradient_checkpointing": False},
    "full gc": {"method": "full", "gradient_checkpointing": True},
    "full": {"method": "full", "gradient_checkpointing": False},
    "freeze 1": {"method": "freeze", "frozen_layers": 1, "gradient_checkpointing": False},
    "freeze attn": {"method": "freeze", "frozen_layers": 1, "train_modules": "attention"},
    "full amp gc": {"method": "full", "precision": "amp_bf16", "gradient_checkpointing": True},
    "qlora nf4 gc": {**LORA, "quantization": "nf4", "gradient_checkpointing": True},
}


def family_config(model_type: str) -> dict[str, Any]:
    """The tiny config of `model_type`: the SIZES its config class knows (by its own names or
    the standard ones it maps), what FAMILIES adds, every dropout it has at 0."""
    from transformers import AutoConfig

    extra = dict(FAMILIES[model_type])
    if isinstance(extra.get("text_config"), str):  # a vision-language model around a text one
        text = family_config(extra["text_config"])
        del text["model_type"]
        return {"model_type": model_type, **extra, "text_config": text, **SPECIAL_TOKENS}
    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    values = {"model_type": model_type}
    values.update({name: value for name, value in SIZES.items() if name in known})
    values.update(extra)
    for name in NO_DROPOUT:
        if name in known:
            values[name] = 0.0
    return values


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"


def checks(model: str, recipe: Any) -> str:
    """What a study and `train` tell the user before loading weights ("" when it may run)."""
    from autotune.architecture import check_recipe
    from autotune.model_spec import load_model_spec
    from autotune.replay import load_config

    recipe.validate()
    spec = load_model_spec(model)
    spec.check_recipe(recipe, "recipe")
    check_recipe(recipe, load_config(model), "recipe", "cpu")
    return ""


def run_case(model: str, fields: dict[str, Any]) -> dict[str, Any]:
    from autotune.errors import UsageError
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe
    from autotune.replay import load_config, replay
    from autotune.step_trace import trace_step

    recipe = Recipe.from_dict({"model": model, **STEP, "seq_len": SEQ_LEN, **fields})
    row: dict[str, Any] = {}
    try:
        checks(model, recipe)
    except UsageError as error:
        row["refused"] = str(error)
        return row
    except Exception as error:  # noqa: BLE001 - a check that crashes is a defect
        row["crashed"] = "checks: " + traceback.format_exc(limit=-3)
        row["crash_line"] = "checks: " + _one_line(error)
        return row
    started = time.perf_counter()
    try:
        trace = trace_step(recipe)
    except Exception as error:  # noqa: BLE001
        row["crashed"] = "step: " + traceback.format_exc(limit=-4)
        row["crash_line"] = "step: " + _one_line(error)
        return row
    row["traced_bytes"] = trace.peak_bytes
    row["trace_seconds"] = round(time.perf_counter() - started, 1)
    row["at_peak"] = [list(group) for group in trace.by_op()[:8]]
    try:
        replayed = replay(recipe, load_config(model), cublas_workspace_bytes=0)
        row["replay_bytes"] = replayed.peak_allocated_bytes
        row["replay_ratio"] = round(replayed.peak_allocated_bytes / trace.peak_bytes, 4)
    except Exception as error:  # noqa: BLE001 - the real step ran: the replay must too
        row["replay_crashed"] = traceback.format_exc(limit=-4)
        row["replay_crash_line"] = _one_line(error)
    try:
        formula = estimate(load_model_spec(model), recipe)
        row["formula_ratio"] = round(formula.allocated_without_cublas_bytes / trace.peak_bytes, 4)
    except Exception as error:  # noqa: BLE001
        row["formula_failed"] = _one_line(error)
    return row


def status(row: dict[str, Any]) -> str:
    if "refused" in row:
        return "refused"
    if "crashed" in row:
        return "CRASH"
    if "replay_crashed" in row:
        return "REPLAY CRASH"
    if under_traced(row["replay_ratio"]):
        return "UNDER"
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated model types (default: all)")
    parser.add_argument("--recipes", help="comma-separated recipe labels (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/replay_families_cpu.json"))
    args = parser.parse_args()
    import warnings

    import transformers

    from autotune.random_model import build_random_model

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    families = args.families.split(",") if args.families else list(FAMILIES)
    recipes = args.recipes.split(",") if args.recipes else list(RECIPES)
    rows = []
    print(f"{'family':<13} {'recipe':<13} {'status':<12} {'replay':>7} {'formula':>7}  detail")
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            try:
                model = str(
                    build_random_model(family_config(family), Path(tmp) / family, TOKENIZER)
                )
            except Exception as error:  # noqa: BLE001 - a config this sweep cannot make
                print(f"{family:<13} {'-':<13} {'no model':<12} {'':>7} {'':>7}  {error}")
                rows.append({"family": family, "no_model": _one_line(error)})
                continue
            for label in recipes:
                row = {"family": family, "recipe": label, **run_case(model, RECIPES[label])}
                row["status"] = status(row)
                rows.append(row)
                detail = (
                    row.get("refused")
                    or row.get("crash_line")
                    or row.get("replay_crash_line")
                    or row.get("formula_failed", "")
                )
                ratios = [
                    f"{row[key]:7.3f}" if key in row else f"{'-':>7}"
                    for key in ("replay_ratio", "formula_ratio")
                ]
                print(f"{family:<13} {label:<13} {row['status']:<12} {' '.join(ratios)}  {detail}")
                sys.stdout.flush()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("status", "no model")] = counts.get(row.get("status", "no model"), 0) + 1
    ran = [row for row in rows if "replay_ratio" in row]
    print("counts:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if ran:
        worst = min(ran, key=lambda row: row["replay_ratio"])
        highest = max(ran, key=lambda row: row["replay_ratio"])
        print(
            f"replay/traced: lowest {worst['replay_ratio']} ({worst['family']} {worst['recipe']}),"
            f" highest {highest['replay_ratio']} ({highest['family']} {highest['recipe']})"
        )
    write_results(
        args.out,
        "replay_families.py",
        "cpu",
        counts,
        transformers=transformers.__version__,
        sizes={**SIZES, "seq_len": SEQ_LEN, **STEP},
        tolerance=REPLAY_TOLERANCE,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
