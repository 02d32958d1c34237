"""What a freeze recipe trains: the decoder blocks autotune finds in a causal LM, the part of
each block that trains by train_modules, and the same selection as names (FreezeLayout), which
the exports write as other trainers' freeze options.

A study reads the layout from the model built on the meta device and stores it, so an export
names the modules the model has (GPT-NeoX's `attention`, GPT-2's `attn`, Falcon's
`self_attention`), not Llama's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

BLOCK_LISTS = ("layers", "h", "blocks")
"""What causal LMs name their list of decoder blocks, under the base model (or its language
model): model.layers (the Llama family, Gemma, Phi, ...), transformer.h (GPT-2, Falcon),
gpt_neox.layers, model.language_model.layers (Gemma 3)."""
BLOCK_PARTS = {
    "attention": ("self_attn", "attn", "attention", "self_attention", "linear_attn"),
    "mlp": ("mlp", "feed_forward"),
}
"""What a decoder block names its attention (Qwen3-Next's linear-attention blocks: linear_attn)
and its MLP, by train_modules."""


def decoder_blocks(model: Any) -> Any:
    """The list of decoder blocks of a causal LM (through a peft wrapper too); ValueError
    where the model names it otherwise."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "base_model", base)
    # a vision-language model's (Gemma 3's) decoder blocks are its language model's
    for owner in (inner, getattr(inner, "language_model", None)):
        for name in BLOCK_LISTS:
            blocks = getattr(owner, name, None)
            if isinstance(blocks, torch.nn.ModuleList):
                return blocks
    raise ValueError(
        f"{type(base).__name__} has no list of decoder blocks named {', '.join(BLOCK_LISTS)}"
    )


def part_name(block: Any, train_modules: str) -> str:
    """The name of a decoder block's attention or MLP; ValueError where it names them otherwise."""
    for name in BLOCK_PARTS[train_modules]:
        if hasattr(block, name):
            return name
    raise ValueError(
        f"{type(block).__name__} has no {train_modules} module named "
        f"{', '.join(BLOCK_PARTS[train_modules])}"
    )


def block_part(block: Any, train_modules: str) -> Any:
    """The attention or the MLP of a decoder block; ValueError where it names them otherwise."""
    return getattr(block, part_name(block, train_modules))


def freeze(model: Any, frozen_layers: int, train_modules: str) -> None:
    """Freeze `model` as a freeze recipe does: the input embedding (and the output head tied to
    it) and the lowest `frozen_layers` decoder blocks; of the blocks above, only the part
    `train_modules` names trains (its norms stay frozen) unless it is all. The rest (the final
    norm, an untied head) trains."""
    model.get_input_embeddings().requires_grad_(False)
    if model.config.tie_word_embeddings:
        model.get_output_embeddings().requires_grad_(False)
    for index, block in enumerate(decoder_blocks(model)):
        if index < frozen_layers:
            block.requires_grad_(False)
        elif train_modules != "all":
            block.requires_grad_(False)
            block_part(block, train_modules).requires_grad_(True)


@dataclass(frozen=True)
class FreezeLayout:
    """Where a model keeps what a freeze recipe trains, by name: plain values, stored with a
    study (to_dict) and read back by its exports (from_dict)."""

    blocks: str
    """The dotted name of the list of decoder blocks: model.layers, gpt_neox.layers,
    transformer.h."""
    num_layers: int
    parts: dict[str, tuple[str, ...]]
    """train_modules (attention, mlp) -> the name of that part in each block, in block order;
    absent where some block has none."""
    trained_outside: tuple[str, ...]
    """The parameters outside the blocks that every freeze recipe trains: the final norm, an
    untied output head (and whatever else is neither the input embedding nor a block, such as
    GPT-2's position embeddings)."""
    ambiguous_outside: tuple[str, ...] = ()
    """The modules of `trained_outside` whose last name is part of other parameters' names
    (Llama's final `norm`, in every block's `input_layernorm`): a trainer that picks modules by
    substring cannot name them alone."""

    def trained_modules(self, frozen_layers: int, train_modules: str) -> list[str]:
        """The modules that train whole: the blocks from `frozen_layers` up, or their part that
        `train_modules` names."""
        layers = range(frozen_layers, self.num_layers)
        if train_modules == "all":
            return [f"{self.blocks}.{i}" for i in layers]
        return [f"{self.blocks}.{i}.{self.parts[train_modules][i]}" for i in layers]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> FreezeLayout:
        return cls(
            blocks=str(stored["blocks"]),
            num_layers=int(stored["num_layers"]),
            parts={key: tuple(names) for key, names in stored["parts"].items()},
            trained_outside=tuple(stored["trained_outside"]),
            ambiguous_outside=tuple(stored.get("ambiguous_outside", ())),
        )


def llama_layout(num_layers: int, tied_head: bool | None) -> FreezeLayout:
    """The layout of the Llama family (model.layers, self_attn, mlp, model.norm, lm_head): what
    an export assumes of a study that did not store its model's (a tied head, None: not known,
    listed as lm_head)."""
    head = () if tied_head else ("lm_head.weight",)
    return FreezeLayout(
        blocks="model.layers",
        num_layers=num_layers,
        parts={"attention": ("self_attn",) * num_layers, "mlp": ("mlp",) * num_layers},
        trained_outside=("model.norm.weight", *head),
        ambiguous_outside=("model.norm",),
    )


def freeze_layout(model: Any) -> FreezeLayout:
    """The layout of `model` (on the meta device will do), read by freezing it as a freeze
    recipe does (its parameters' requires_grad change); ValueError where autotune finds no
    decoder blocks in it."""
    blocks = decoder_blocks(model)
    module_names = {id(module): name for name, module in model.named_modules()}
    parts = {}
    for modules in BLOCK_PARTS:
        try:
            parts[modules] = tuple(part_name(block, modules) for block in blocks)
        except ValueError:
            continue
    freeze(model, len(blocks), "all")
    names = [name for name, _ in model.named_parameters()]
    trained = tuple(name for name, p in model.named_parameters() if p.requires_grad)
    ambiguous = []
    for module in dict.fromkeys(name.rpartition(".")[0] for name in trained):
        last = module.rpartition(".")[2]
        others = [n for n in names if not n.startswith(f"{module}.")]
        if not module or any(last in other for other in others):
            ambiguous.append(module)
    return FreezeLayout(module_names[id(blocks)], len(blocks), parts, trained, tuple(ambiguous))
