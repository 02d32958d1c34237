"""What a training step holds at its memory peak, tensor by tensor, traced on the CPU.

`trace_step` runs one optimizer step of a recipe with the probe's own builder and step loop
(for a distributed recipe's rank, its strategy's wrapping or DeepSpeed's engine), then follows
every storage a second step allocates (a torch dispatch mode: each storage counted once, from
the op that made it until it is released). Its peak of allocated bytes is what the
replay memory model (autotune.replay) has to reach, and the tensors alive at the peak say which
buffers coexist there. bench/memory_trace.py prints it next to the memory model's figure.

What this cannot show: the caching allocator's reserved-minus-allocated (no CUDA here), and
kernels whose CPU versions allocate differently from CUDA's (dropout keeps an fp32 mask on the
CPU where CUDA keeps one byte; SDPA's CPU kernels; bitsandbytes' CPU paths). One such
difference is counted as CUDA makes it: softmax's backward holds a temporary of the gradient's
size on CUDA (`grad * output`), an attention matrix under eager attention or SDPA's math path.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.recipe import Recipe
from autotune.tied_gradients import SharedShapes, sums_in_place, tied_gradient_shapes
from autotune.training.deepspeed_engine import is_engine
from autotune.training.host_held import local_shard, optimizer_state_tensors

if TYPE_CHECKING:
    from autotune.training.ranks import RankPlace

REPLAY_TOLERANCE = 0.005
"""How far a replayed peak may stand from the traced one, as a share of it: the replay rounds
blocks to 512 bytes, the trace counts bytes."""


def under_traced(ratio: float) -> bool:
    """Whether a prediction `ratio` times the traced peak falls short of it beyond the
    tolerance."""
    return ratio < 1 - REPLAY_TOLERANCE


@dataclass(frozen=True)
class LiveTensor:
    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Trace:
    peak_bytes: int
    """Allocated bytes at the peak: what existed before the step plus what the step made."""
    before_bytes: int
    at_peak: list[LiveTensor] = field(default_factory=list)
    """Tensors the step made that were alive at the peak, largest first."""

    def by_op(self) -> list[tuple[str, str, int, int]]:
        """(op, dtype, bytes, count) of the tensors alive at the peak, largest total first."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for tensor in self.at_peak:
            group = groups[(tensor.op, tensor.dtype)]
            group[0] += tensor.nbytes
            group[1] += 1
        rows = [(op, dtype, total, count) for (op, dtype), (total, count) in groups.items()]
        return sorted(rows, key=lambda row: -row[2])


def allocation_tracer(existing: list[Any], tied: SharedShapes = frozenset()) -> Any:
    """A dispatch mode that follows every storage the ops under it allocate; storages of the
    `existing` tensors (weights, optimizer states) are known and not counted again; their
    bytes, each storage once, are `before`. The gradients of the `tied` parameters
    (autotune.tied_gradients) are summed in place, as autograd does without the mode. (Its
    class is made here, where torch is imported.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    softmax_backward = torch.ops.aten._softmax_backward_data.default

    class AllocationTracer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            known = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in existing}
            self.known = set(known)
            self.before = sum(known.values())
            self.live: dict[int, LiveTensor] = {}
            self.now = self.peak = 0
            self.at_peak: list[LiveTensor] = []

        def _released(self, key: int) -> None:
            tensor = self.live.pop(key, None)
            if tensor is not None:
                self.now -= tensor.nbytes

        def release(self, tensor: Any) -> None:
            """`tensor`'s storage gave its bytes back without dying (FSDP2's resize to 0)."""
            self._released(local_shard(tensor).untyped_storage()._cdata)

        def track(self, tensor: Any, op: str = "resize_") -> None:
            tensor = local_shard(tensor)
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.known or key in self.live or storage.nbytes() == 0:
                return
            self.live[key] = LiveTensor(
                storage.nbytes(),
                op,
                tuple(tensor.shape),
                str(tensor.dtype).removeprefix("torch."),
            )
            self.now += storage.nbytes()
            weakref.finalize(storage, self._released, key)
            if self.now > self.peak:
                self.peak = self.now
                self.at_peak = list(self.live.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if sums_in_place(func, args, kwargs, tied):
                return args[0].add_(args[1])
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket.__name__)
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.track(tensor, name)
            if func is softmax_backward:
                # CUDA's kernel multiplies the gradient by the output into a temporary first
                # (softmax_backward_cuda_out), alive beside its output; the CPU's does not
                grad, output = args[:2]
                self.track(grad * output, name)
            return out

    return AllocationTracer()


def _resizes_seen(recipe: Recipe, tracer: Any) -> Any:
    """FSDP2's storage resizes, told to the tracer (nothing to tell otherwise)."""
    import contextlib

    from autotune.meta_fsdp import fsdp_storage_resizes

    if recipe.distributed != "fsdp":
        return contextlib.nullcontext()
    return fsdp_storage_resizes(tracer.track, tracer.release)


def model_tensors(model: Any, optimizer: Any) -> list[Any]:
    """The tensors a step starts from: parameters (a DTensor's shard), buffers, optimizer
    states."""
    weights = [local_shard(t) for t in (*model.parameters(), *model.buffers())]
    return weights + optimizer_state_tensors(optimizer)


def held_tensors() -> list[Any]:
    """Every tensor the process holds: a DeepSpeed engine keeps flat buffers, partitions and
    their optimizer states in its own structures, beside the model's parameters."""
    import gc

    import torch

    gc.collect()
    # type(), not isinstance: a deprecated torch alias warns when its __class__ is read
    found = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    return [t for t in found if t.device.type != "meta"]


def trace_step(
    recipe: Recipe,
    seed: int = 0,
    place: RankPlace | None = None,
    padded: bool = False,
    row_tokens: int | None = None,
) -> Trace:
    """Peak allocated memory of one optimizer step of `recipe` (the second one: the first makes
    the optimizer states), with the probe's loader, builder and step loop, on the CPU; with
    `place`, of that rank of a distributed recipe (its process group joined), its share of the
    step's sequences. Its sequences are `row_tokens` long (seq_len where None: data whose
    longest example is shorter gives shorter ones); with `padded`, those after the first of
    each micro-batch are 3/4 as long (padding, and an attention mask, in a padded batching)."""
    import torch

    from autotune.data.tokens import TokenizedExample
    from autotune.training.build import build_model, build_optimizer
    from autotune.training.loop import train_steps
    from autotune.training.ranks import distribute_model, train_with_engine

    torch.manual_seed(seed)
    model = build_model(recipe, "cpu")
    vocab = model.config.get_text_config().vocab_size
    if place is not None:
        model = distribute_model(model, recipe, place)
    optimizer = build_optimizer(model, recipe)
    if place is not None:
        model, optimizer = train_with_engine(model, optimizer, recipe, place)
    generator = torch.Generator().manual_seed(seed)
    examples = []
    longest = row_tokens or recipe.seq_len
    for index in range(recipe.per_gpu_batch_size):
        shorter = padded and index % recipe.micro_batch_size > 0
        length = longest * 3 // 4 if shorter else longest
        examples.append(
            TokenizedExample(
                input_ids=torch.randint(1, vocab, (length,), generator=generator).tolist(),
                labels=torch.randint(1, vocab, (length,), generator=generator).tolist(),
            )
        )
    train_steps(model, optimizer, [examples], recipe, "cpu", 0)
    existing = held_tensors() if is_engine(model) else model_tensors(model, optimizer)
    tracer = allocation_tracer(existing, tied_gradient_shapes(model))
    with tracer, _resizes_seen(recipe, tracer):
        train_steps(model, optimizer, [examples], recipe, "cpu", 0)
    at_peak = sorted(tracer.at_peak, key=lambda t: -t.nbytes)
    return Trace(
        peak_bytes=tracer.before + tracer.peak, before_bytes=tracer.before, at_peak=at_peak
    )
