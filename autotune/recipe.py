"""Recipe: one fine-tuning strategy, the unit autotune searches over, measures and exports.

The YAML keys are a contract with users and other tools; `from_dict` validates everything at the
edge (recipe_checks.py) and reports all problems in one error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from autotune.distributed import DEFAULT_DISTRIBUTED
from autotune.distributed import label_part as distributed_label
from autotune.errors import UsageError, first_line
from autotune.losses import DEFAULT_LOSS
from autotune.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS
from autotune.own_files import RECIPE_KEY
from autotune.quantizations import QUANTIZATIONS

RECIPE_FORMAT_VERSION = 1

Method = Literal["full", "lora", "freeze"]
LEFT_OUT_METHODS = {
    "bottleneck": "bottleneck adapters come from the adapters library, whose newest release "
    "(1.3.0) needs transformers 4.57 and autotune runs on transformers 5; use lora",
}
"""Methods users ask for that autotune does not run, and why (one line each)."""
TrainModules = Literal["all", "attention", "mlp"]
Quantization = str
"""A name in quantizations.QUANTIZATIONS."""
Precision = str
"""A name in precisions.PRECISIONS."""
Optimizer = str
"""A name in the optimizer registry (optimizers.OPTIMIZERS)."""
Attention = str
"""A name in attentions.ATTENTIONS."""
Batching = str
"""A name in batchings.BATCHINGS."""
Loss = str
"""A name in losses.LOSSES."""
LrSchedule = Literal["cosine", "linear", "constant"]
WARMUP_FRACTION = 0.03
"""Warm-up when a recipe gives no warmup_steps: this share of the run's steps (at least 1)."""

OTHER_FORMAT_KEYS = {
    "training_arguments": "hf",
    "base_model": "axolotl",
    "finetuning_type": "llamafactory",
    "compute_environment": "accelerate",
}
"""A key each `autotune export --format` other than autotune's writes and a recipe never has
-> that format: such a file is another trainer's configuration, not a recipe to read."""

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
OFF_BY_DEFAULT = ("use_dora", "activation_offload")
"""Switches a recipe writes only when they are on (added after recipes were first hashed)."""
UPPER_BOUNDS = {
    "micro_batch_size": 4096,
    "gradient_accumulation_steps": 65536,
    "seq_len": 1 << 20,
    "lora_r": 65536,
    "frozen_layers": 10_000,
}
"""Beyond these no recipe is meant: a value past one is a typo, and pricing it could take the
machine's memory (the model-tied bounds, rank within the layer width, come with the model)."""


@dataclass(frozen=True)
class Recipe:
    """One way to fine-tune one model. Field docs double as the YAML reference."""

    model: str = ""
    """Hugging Face model id or local directory."""
    method: Method = "lora"
    """full: every weight trains; lora: low-rank adapters on a frozen base; freeze: the lowest
    `frozen_layers` decoder blocks and the embeddings are frozen, the rest trains."""
    quantization: Quantization = "none"
    """Base weights in bitsandbytes int8 or NF4 (QLoRA); only with method lora."""
    precision: Precision = "bf16"
    """bf16/fp16/fp32: weights stored so; amp_bf16/amp_fp16: fp32 weights and autocast."""
    lora_r: int | None = None
    """LoRA rank (method lora only)."""
    lora_alpha: int | None = None
    """LoRA scaling numerator (method lora only)."""
    lora_dropout: float | None = None
    """Dropout on the adapter input (method lora only)."""
    lora_target_modules: str | tuple[str, ...] | None = None
    """"all-linear" or a list of linear module names such as [q_proj, v_proj]."""
    use_dora: bool = False
    """DoRA (peft's use_dora, method lora only): each adapted linear also trains a magnitude
    per output feature and runs as magnitude * (W + BA) / ||W + BA||, the base weight merged
    with the adapter in every forward (more memory and time than LoRA, often better quality)."""
    frozen_layers: int = 0
    """The lowest N decoder blocks get no gradient (method freeze only)."""
    train_modules: TrainModules = "all"
    """What trains in the decoder blocks above the frozen ones (method freeze only): all of
    each block; attention (its self-attention only: q/k/v/o, their biases and q/k norms); mlp
    (its feed-forward only, experts and router included). The blocks' two norms train only
    with all; the final norm and an untied output head train in every case."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool = True
    """Recompute block activations in backward instead of storing them."""
    activation_offload: bool = False
    """Move the tensors the forward saves for backward to (pinned) host memory as they are
    made, and back when backward needs them (torch's save_on_cpu): less GPU memory for
    host memory and transfer time; the same loss and gradients."""
    optimizer: Optimizer = DEFAULT_OPTIMIZER
    """adamw (torch's fused AdamW), adamw_foreach (torch's foreach AdamW), adamw_8bit or
    paged_adamw_8bit (bitsandbytes); see optimizers.OPTIMIZERS."""
    learning_rate: float = 2.0e-4
    """Peak learning rate."""
    lr_schedule: LrSchedule = "cosine"
    """After warm-up, the learning rate falls from learning_rate to 0 at the run's last step
    along a half cosine (cosine) or a straight line (linear), or stays (constant)."""
    warmup_steps: int | None = None
    """Optimizer steps over which the learning rate rises linearly to learning_rate; unset: 3%
    of the run's steps, at least 1."""
    seq_len: int = 1024
    """Tokens per sequence; longer samples are truncated."""
    expandable_segments: bool = False
    """Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation)."""
    attention: Attention = "sdpa"
    """Attention implementation: sdpa (torch's fused kernels), eager (keeps the full attention
    matrix), flash_attention_2 (needs the flash-attn package)."""
    batching: Batching = "padded"
    """padded: each micro-batch is right-padded to its longest sequence; padding_free: its
    sequences are laid end to end in one row, with positions restarting and attention kept
    inside each sequence, so no compute or memory goes to padding; packed: a step's sequences
    are packed into rows of up to seq_len tokens (first fit, longest first), micro_batch_size
    rows per pass, attention kept inside each sequence."""
    loss: Loss = DEFAULT_LOSS
    """standard: the model's own cross-entropy over the whole micro-batch's logits; chunked:
    the output head and the cross-entropy applied to chunks of the tokens, each recomputed in
    backward, so one chunk's logits exist at a time (pure PyTorch, any device); fused_linear:
    Liger's fused linear cross-entropy (the liger-kernel package, CUDA only). The same loss and
    gradients; the last two keep far less memory on large vocabularies."""
    distributed: str = DEFAULT_DISTRIBUTED
    """none: one GPU; ddp: torch's DistributedDataParallel (a full replica per GPU); fsdp:
    torch's FSDP2 (parameters, gradients and optimizer states sharded over the GPUs, each
    decoder block a unit); deepspeed_zero2 / deepspeed_zero3: DeepSpeed ZeRO (probed where
    deepspeed is installed). See distributed.DISTRIBUTED."""
    num_gpus: int = 1
    """GPUs (one process each) the recipe trains on; each takes micro_batch_size x
    gradient_accumulation_steps sequences of a step."""
    offload: str = "none"
    """With fsdp or deepspeed: what lives in host memory. optimizer: the optimizer states and
    their step (ZeRO-Offload); optimizer_and_params: those and the parameter and gradient shards
    (FSDP's CPU offload, ZeRO-3's offload_param). See distributed.OFFLOADS."""

    # ---- derived -------------------------------------------------------------------------

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step over all GPUs."""
        return self.per_gpu_batch_size * self.num_gpus

    @property
    def per_gpu_batch_size(self) -> int:
        """Sequences per optimizer step on each GPU."""
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def uses_bitsandbytes(self) -> bool:
        return self.quantization != "none" or OPTIMIZERS[self.optimizer].bitsandbytes

    def label(self) -> str:
        """A short human name: 'QLoRA nf4 r16 all-linear mb1 gc'."""
        if self.method == "lora":
            name = QUANTIZATIONS[self.quantization].adapter_name
            targets = self.lora_target_modules
            target_text = (
                targets
                if isinstance(targets, str)
                else "/".join(t.removesuffix("_proj") for t in targets or ())
            )
            head = f"{name} r{self.lora_r} {target_text}"
            if self.use_dora:
                head = head.replace("LoRA", "DoRA", 1)
        elif self.method == "freeze":
            head = f"freeze {self.frozen_layers}"
            if self.train_modules != "all":
                head += f" {self.train_modules}"
        else:
            head = "full"
        parts = [head, self.precision, f"mb{self.micro_batch_size}"]
        if self.gradient_checkpointing:
            parts.append("gc")
        if self.activation_offload:
            parts.append("offload")
        if self.optimizer != DEFAULT_OPTIMIZER:
            parts.append(self.optimizer)
        if self.attention != "sdpa":
            parts.append(self.attention)
        if self.batching != "padded":
            parts.append(self.batching.replace("_", "-"))
        if self.loss != DEFAULT_LOSS:
            parts.append(f"{self.loss.replace('_', '-')}-loss")
        if distributed_label(self):
            parts.append(distributed_label(self))
        return " ".join(parts)

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping, keys in the documented order, LoRA keys only for method lora,
        warmup_steps only when set, train_modules, distributed and num_gpus only when not their
        defaults, the OFF_BY_DEFAULT switches only when on (recipes from before them read and
        hash as they did)."""
        data: dict[str, Any] = {RECIPE_KEY: RECIPE_FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in LORA_KEYS and self.method != "lora":
                continue
            if f.name == "warmup_steps" and value is None:  # left out: the default share
                continue
            if f.name in _LEFT_OUT_AT_DEFAULT and value == f.default:
                continue
            if f.name in OFF_BY_DEFAULT and value is False:
                continue
            if isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build and validate a recipe; `measured` and `autotune_recipe` are read and dropped."""
        if not isinstance(data, dict):
            raise UsageError(
                f"{source}: expected a mapping of recipe keys, got {type(data).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        other_format = next((OTHER_FORMAT_KEYS[k] for k in OTHER_FORMAT_KEYS if k in data), None)
        if other_format is not None and "method" not in data:
            raise UsageError(
                f"{source}: an `autotune export --format {other_format}` configuration, not a "
                "recipe; `autotune export` without --format writes the recipe that train and "
                "estimate read"
            )
        data = dict(data)
        data.pop("measured", None)
        data.pop("predicted", None)
        version = data.pop(RECIPE_KEY, RECIPE_FORMAT_VERSION)
        problems: list[str] = []
        if version != RECIPE_FORMAT_VERSION:
            problems.append(
                f"autotune_recipe is {version!r}, this version reads {RECIPE_FORMAT_VERSION}"
            )
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(f"unknown keys {', '.join(unknown)}")
        if "method" not in data:
            problems.append("missing required key method")
        if problems:
            raise UsageError.collect(problems, source)
        if isinstance(data.get("lora_target_modules"), list):
            data["lora_target_modules"] = tuple(data["lora_target_modules"])
        method = data.get("method")
        if method == "lora":
            data.setdefault("lora_r", 16)
            data.setdefault(
                "lora_alpha", 2 * data["lora_r"] if isinstance(data["lora_r"], int) else 32
            )
            data.setdefault("lora_dropout", 0.05)
            data.setdefault("lora_target_modules", "all-linear")
        recipe = cls(**data)
        recipe.validate(source)
        return recipe

    def validate(self, source: str = "recipe") -> None:
        from autotune.recipe_checks import recipe_problems  # the checks read this module

        problems = recipe_problems(self)
        if problems:
            raise UsageError.collect(problems, source)

    def to_yaml(self, measured: dict[str, Any] | None = None) -> str:
        data = self.to_dict()
        if measured:
            data["measured"] = measured
        # allow_unicode: a verdict's "±15%" as written, not "\xB115%"
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "recipe") -> Recipe:
        return cls.from_dict(load_yaml(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        return cls.load_measured(path)[0]

    @classmethod
    def load_measured(cls, path: str | Path) -> tuple[Recipe, dict[str, Any]]:
        """The recipe in a file and the figures under its `measured:` (empty where it has none),
        from one read of the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"recipe file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"recipe file {path} cannot be read: {first_line(error)}") from None
        data = load_yaml(text, str(path))
        recipe = cls.from_dict(data, str(path))  # refuses anything but a mapping
        measured = data.get("measured")
        return recipe, measured if isinstance(measured, dict) else {}

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


_LEFT_OUT_AT_DEFAULT = ("train_modules", "distributed", "num_gpus", "offload")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error (YAML says
    keys are unique; PyYAML keeps the last silently, so an edit near the top would not count)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key} given twice (first on line {first_lines[key]}); keep one",
                    key_node.start_mark,
                )
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """The YAML document in `text` (a recipe or a search space), read safely; a syntax error
    or a key given twice is one line that says where and what:
    `source: not valid YAML (line 3 column 9: ...)`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(problem.split()) if problem else first_line(error)
        raise UsageError(f"{source}: not valid YAML ({where}{what})") from None


__all__ = ["Attention", "Loss", "Recipe", "RECIPE_FORMAT_VERSION"]
