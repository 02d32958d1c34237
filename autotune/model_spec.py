"""What the memory model and the search space need to know about a model, read from its config.

No weights are loaded: a local directory with only `config.json`, or a hub id, is enough.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import UsageError, first_line
from autotune.model_source import check_model_reference, is_local_model
from autotune.remote_code import check_remote_code, remote_code_allowed

if TYPE_CHECKING:
    from autotune.recipe import Recipe

# Decoder blocks of the Llama family (Llama, Qwen2/3, Mistral, DeepSeek-R1 distills, ...):
# attention q/k/v/o and a gated (SwiGLU) MLP. Each name maps to (in_features, out_features).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
BLOCK_LINEARS = ATTENTION_LINEARS + MLP_LINEARS

REQUIRED_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)
FIELD_ALIASES = {
    "hidden_size": ("n_embd", "d_model"),
    "num_hidden_layers": ("n_layer",),
    "num_attention_heads": ("n_head",),
    "intermediate_size": ("n_inner", "ffn_hidden_size", "ffn_dim"),
}
"""Other names families give the required fields (GPT-2 and StarCoder's n_embd, Falcon's
ffn_hidden_size, OPT's ffn_dim), as their transformers configs map them."""
FOUR_WIDE_MLP = ("gpt2", "gpt_bigcode", "falcon", "bloom", "gpt_neo", "gptj", "codegen")
"""Families whose MLP is four times the width where their config names no MLP width."""


SHAPE_FIELDS: dict[str, tuple[int, int, str]] = {
    "hidden_size": (1, 1 << 17, "width"),
    "num_hidden_layers": (1, 1 << 12, "depth"),
    "intermediate_size": (1, 1 << 20, "MLP width"),
    "num_attention_heads": (1, 1 << 12, "number of attention heads"),
    "num_key_value_heads": (1, 1 << 12, "number of key/value heads"),
    "head_dim": (1, 1 << 13, "head width"),
    "vocab_size": (1, 1 << 22, "vocabulary"),
    "num_local_experts": (0, 1 << 14, "number of experts"),
    "num_experts": (0, 1 << 14, "number of experts"),
    "num_experts_per_tok": (1, 1 << 14, "number of experts per token"),
    "moe_intermediate_size": (1, 1 << 20, "expert MLP width"),
    "shared_expert_intermediate_size": (0, 1 << 20, "shared expert MLP width"),
}
"""Config field -> (least, most, what it is): the integers a model's shape may hold. The most
are many times the largest released models' (Llama 3.1 405B: width 16384, 126 layers, MLP
53248; Gemma 3: a vocabulary of 262144; DeepSeek-V3: 256 experts), so a real config passes and
a typo (a width of 1e12, a million layers) is refused before a figure is printed for it."""
MAX_PARAMS = 10 * 10**12
"""The most parameters a config may describe: ten trillion, several times any released model's."""


def check_shape_fields(config: dict[str, Any], source: str) -> None:
    """Refuse, in one line naming each field and value, a config whose shape is no model's: a
    field that is not an integer in its bounds (SHAPE_FIELDS), attention heads that do not
    divide the width where no field names their width (transformers then takes the width over
    the heads, rounded down: GPT-2 refuses it, the Llama family builds a narrower attention),
    key/value heads that do not divide the attention heads (transformers repeats each over a
    whole group), or more experts per token than experts."""
    problems = []
    for name, (least, most, what) in SHAPE_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            problems.append(f"{name} must be an integer of at least {least}, got {value!r}")
        elif value > most:
            problems.append(f"{name} {value} is not a plausible {what} (at most {most:,})")
    if problems:
        raise UsageError.collect(problems, source)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    # head_dim, or the query and value head widths of multi-head latent attention (DeepSeek,
    # GLM-4.7-Flash: qk_head_dim, v_head_dim), where the heads need not divide the width
    head_widths = [key for key in config if key.endswith("head_dim") and config[key] is not None]
    if not head_widths and hidden % heads:
        problems.append(
            f"num_attention_heads {heads} does not divide hidden_size {hidden}, and no head_dim "
            "gives the heads' width"
        )
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is not None and heads % kv_heads:
        problems.append(
            f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}; each "
            "key/value head serves a whole group of attention heads"
        )
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    per_token = config.get("num_experts_per_tok")
    if experts > 1 and per_token is not None and per_token > experts:
        problems.append(f"num_experts_per_tok {per_token} exceeds the model's {experts} experts")
    if problems:
        raise UsageError.collect(problems, source)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    experts: int = 0
    """Routed experts in each block's MLP (Mixtral, Qwen-MoE); 0 for a dense MLP."""
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    qk_norm: bool = False
    """Per-head RMSNorm of queries and keys (Qwen3)."""
    """Each routed expert's SwiGLU width; `intermediate_size` is then the shared expert's (0
    where there is none, as in Mixtral)."""

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block. A MoE block's
        routed experts are not linear layers (transformers keeps them as stacked weights, which
        LoRA's all-linear and bitsandbytes' quantization pass by): see block_expert_params."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
        }
        if i:
            shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        return shapes

    def stacked_expert_tensors(self) -> list[int]:
        """Elements of the routed experts' stacked (3-D) weights of one block: the gate and up
        projections, and the down projection."""
        if not self.experts:
            return []
        h, e, i = self.hidden_size, self.experts, self.expert_intermediate_size
        return [e * 2 * i * h, e * h * i]

    def expert_tensors(self) -> list[int]:
        """Elements of each expert weight of one block: the stacked ones, the router (and the
        shared expert's one-output gate where there is one)."""
        if not self.experts:
            return []
        router = [self.experts * self.hidden_size]
        gate = [self.hidden_size] if self.intermediate_size else []
        return self.stacked_expert_tensors() + router + gate

    @property
    def block_expert_params(self) -> int:
        return sum(self.expert_tensors())

    @property
    def block_stacked_expert_params(self) -> int:
        return sum(self.stacked_expert_tensors())

    @property
    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def block_other_params(self) -> int:
        """Norm weights and attention biases of one block: small, never quantized."""
        bias = self.q_dim + 2 * self.kv_dim if self.attention_bias else 0
        return 2 * self.hidden_size + bias + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate output projection; zero when tied to the input embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        per_block = self.block_linear_params + self.block_other_params + self.block_expert_params
        return (
            self.num_layers * per_block
            + self.embedding_params
            + self.lm_head_params
            + self.hidden_size
        )

    def recipe_problems(self, recipe: Recipe) -> list[str]:
        """What of `recipe` this model's shape rules out, one line each: a LoRA rank beyond the
        model's width (no layer has a higher rank; pricing one would take the machine's
        memory), or freezing every block."""
        problems = []
        if recipe.method == "lora" and (recipe.lora_r or 0) > self.hidden_size:
            problems.append(
                f"lora_r {recipe.lora_r} exceeds the model's width {self.hidden_size}; a "
                "rank is at most the width of the layers it adapts"
            )
        if recipe.method == "freeze" and recipe.frozen_layers >= self.num_layers:
            problems.append(
                f"frozen_layers {recipe.frozen_layers} leaves nothing to train in a "
                f"{self.num_layers}-layer model"
            )
        return problems

    def check_recipe(self, recipe: Recipe, source: str) -> None:
        problems = self.recipe_problems(recipe)
        if problems:
            raise UsageError.collect(problems, source)

    def target_linears(self, targets: str | tuple[str, ...]) -> tuple[str, ...]:
        """The block linears a LoRA target list selects (peft's all-linear excludes lm_head)."""
        linears = tuple(self.linear_shapes())
        if targets == "all-linear":
            return linears
        unknown = [t for t in targets if t not in linears]
        if unknown:
            raise UsageError(
                f"lora_target_modules {', '.join(unknown)} are not linear layers of a "
                f"{self.model_type} block; choose from {', '.join(linears)}"
            )
        return tuple(targets)

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str = "config") -> ModelSpec:
        if "text_config" in config and "hidden_size" not in config:
            config = {**config["text_config"], "model_type": config.get("model_type", "")}
        config = dict(config)
        for name, aliases in FIELD_ALIASES.items():
            if config.get(name) is None:
                config[name] = next((config[a] for a in aliases if config.get(a) is not None), None)
        width = config.get("hidden_size")
        if config["intermediate_size"] is None and config.get("model_type") in FOUR_WIDE_MLP:
            config["intermediate_size"] = 4 * width if isinstance(width, int) else None
        missing = [name for name in REQUIRED_FIELDS if config.get(name) is None]
        if missing:
            kind = config.get("model_type") or "unknown"
            raise UsageError(
                f"{source}: architecture {kind!r} is not supported: config lacks "
                f"{', '.join(missing)}"
            )
        check_shape_fields(config, source)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        # Mixtral names its experts num_local_experts, the Qwen MoE models num_experts; every
        # block is taken as MoE (as in the released Qwen-MoE configs: decoder_sparse_step 1).
        experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
        intermediate = int(config["intermediate_size"])
        moe: dict[str, int] = {}
        if experts > 1:
            moe = {
                "experts": experts,
                "experts_per_token": int(config.get("num_experts_per_tok") or 1),
                "expert_intermediate_size": int(
                    config.get("moe_intermediate_size") or intermediate
                ),
            }
            intermediate = int(config.get("shared_expert_intermediate_size") or 0)
        spec = cls(
            model_type=str(config.get("model_type", "unknown")),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(
                config.get("attention_bias", config.get("model_type") in ("qwen2", "qwen2_moe"))
            ),
            qk_norm=config.get("model_type") in ("qwen3", "qwen3_moe"),
            **moe,
        )
        if spec.total_params > MAX_PARAMS:
            raise UsageError(
                f"{source}: a model of {spec.total_params:,} parameters is not plausible (at most "
                f"{MAX_PARAMS:,}); check hidden_size, num_hidden_layers, intermediate_size and "
                "vocab_size"
            )
        return spec


def load_model_spec(model: str) -> ModelSpec:
    """Read a model's config from a local directory (config.json) or the Hugging Face hub."""
    check_model_reference(model)
    if is_local_model(model):
        path = Path(model).expanduser()
        config_path = path / "config.json" if path.is_dir() else path
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"model directory {path} has no config.json") from None
        except (OSError, ValueError) as error:
            raise UsageError(f"{config_path} is not a readable JSON config: {error}") from None
        if not isinstance(config, dict):
            raise UsageError(f"{config_path} is not a JSON object")
        check_remote_code(config, model)
        return ModelSpec.from_config_dict(config, source=str(config_path))
    try:
        from transformers import AutoConfig

        config_obj = AutoConfig.from_pretrained(model, trust_remote_code=remote_code_allowed())
    except Exception as error:  # noqa: BLE001 - hub, network and parsing errors all mean "cannot read"
        raise UsageError(
            f"cannot read the config of model {model!r}: {first_line(error)}"
        ) from None
    return ModelSpec.from_config_dict(config_obj.to_dict(), source=model)
