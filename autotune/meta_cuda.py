"""What the meta device cannot run, emulated with CUDA's memory behaviour for the replay
(autotune.replay): a recorder that puts every meta storage through the caching allocator model,
autocast's casts, SDPA's kernel choice, fused AdamW on meta tensors, and bitsandbytes' caches
kept apart per replay.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from autotune.allocator import CachingAllocator
from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.meta_attention import attention_functions
from autotune.meta_host import HostMemory
from autotune.recipe import Recipe
from autotune.training.host_held import local_shard


class Recorder:
    """Follows every meta storage the ops under it allocate, allocating and freeing it in the
    caching allocator model when it is made and released; counts what is alive by phase."""

    def __init__(self, allocator: CachingAllocator) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.allocator = allocator
        self.phase = "weights"
        self.live: dict[int, tuple[Any, str]] = {}
        self.by_phase: dict[str, int] = defaultdict(int)
        self.at_peak: dict[str, int] = {}
        self.events: list[tuple[int, int, str]] = []
        """(storage key, block bytes, phase) of each allocation, and (key, 0, "") of each
        release, in order: what was alive at the peak is read back from it (`live_at_peak`)."""
        self.peak_event = 0
        """How many events had happened when the allocated peak was last reached."""
        self.paused = False
        self.kernels: dict[Any, Any] = {
            torch.ops.aten._safe_softmax.default: self.safe_softmax,
            torch.ops.aten._softmax_backward_data.default: self.softmax_backward,
            torch.ops.aten._grouped_mm.default: self.grouped_mm,
        }
        """Ops run by a replacement that allocates (and tracks) what CUDA's kernel does."""
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                from torch.utils._pytree import tree_leaves

                kernel = recorder.kernels.get(func)
                if kernel is not None:
                    return kernel(*args, **(kwargs or {}))
                out = func(*args, **(kwargs or {}))
                for tensor in tree_leaves(out):
                    recorder.track(tensor)
                return out

        self.mode = Mode()

    def track(self, tensor: Any) -> None:
        import torch

        if self.paused or not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
            return
        tensor = local_shard(tensor)  # a DTensor's shard (FSDP2)
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        block = self.allocator.malloc(storage.nbytes())
        self.live[key] = (block, self.phase)
        self.by_phase[self.phase] += block.size
        self.events.append((key, block.size, self.phase))
        weakref.finalize(storage, self._release, key)
        if self.allocator.allocated_bytes >= self.allocator.peak_allocated_bytes:
            self.at_peak = dict(self.by_phase)
            self.peak_event = len(self.events)

    def safe_softmax(self, scores: Any, dim: int, dtype: Any = None) -> Any:
        """SDPA's math-path softmax as CUDA runs it (the meta kernel makes only the output):
        the softmax, then rows that are all -inf zeroed in place through a mask of them."""
        import torch

        out = torch.softmax(scores, dim, dtype=dtype)
        self.track(out)
        masked = scores.isneginf()
        self.track(masked)
        rows = torch.all(masked, dim=dim, keepdim=True)
        self.track(rows)
        return out

    def softmax_backward(self, grad: Any, output: Any, dim: int, input_dtype: Any) -> Any:
        """Softmax's backward as CUDA runs it (softmax_backward_cuda_out): its output, then
        `grad * output` in a temporary of the gradient's size, alive through the kernel. Under
        an attention matrix (SDPA's math path, eager attention) that is one more matrix beside
        the probabilities, their gradient and the output."""
        import torch

        out = torch.ops.aten._softmax_backward_data.default(grad, output, dim, input_dtype)
        self.track(out)
        self.track(grad * output)
        return out

    def grouped_mm(
        self, mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None
    ) -> Any:
        """The stacked experts' matmul as CUDA runs it for any dtype (bf16 takes the grouped
        kernel, others a loop of matmuls into the one output); the meta kernel takes bf16 only,
        and amp precisions keep the experts in fp32. Only the output is allocated."""
        import torch

        def bf16(tensor: Any) -> Any:
            if tensor is None or tensor.dtype not in (torch.float32, torch.float16):
                return tensor
            return torch.empty_strided(
                tensor.shape, tensor.stride(), dtype=torch.bfloat16, device=tensor.device
            )

        shaped = torch.ops.aten._grouped_mm.default(bf16(mat_a), bf16(mat_b), offs, bf16(bias))
        out = torch.empty_strided(
            shaped.shape, shaped.stride(), dtype=out_dtype or mat_a.dtype, device=mat_a.device
        )
        self.track(out)
        return out

    def release(self, tensor: Any) -> None:
        """`tensor`'s storage gave its bytes back without dying (FSDP2's resize to 0)."""
        self._release(local_shard(tensor).untyped_storage()._cdata)

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            block, phase = entry
            self.by_phase[phase] -= block.size
            self.events.append((key, 0, ""))
            self.allocator.free(block)

    def live_at_peak(self) -> list[tuple[int, str]]:
        """(block bytes, phase) of each block alive at the allocated peak, largest first."""
        live: dict[int, tuple[int, str]] = {}
        for key, size, phase in self.events[: self.peak_event]:
            if size:
                live[key] = (size, phase)
            else:
                live.pop(key, None)
        return sorted(live.values(), reverse=True)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


class Autocast:
    """torch.autocast's lower-precision casts for meta tensors: the matmul functions are wrapped
    (above autograd, so the casts are saved for backward as the real ones are, and checkpoint
    recomputes see them); casts of trainable leaves are cached over a forward."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype
        self.cache: dict[int, Any] = {}
        self.caching = True
        self.enabled = True
        """False inside `torch.autocast(..., enabled=False)` (peft's fold of a LoRA delta into
        stacked expert weights runs in their dtype)."""

    def cast(self, tensor: Any) -> Any:
        import torch

        if (
            not self.enabled
            or not isinstance(tensor, torch.Tensor)
            or not tensor.is_floating_point()
            or tensor.dtype == self.dtype
        ):
            return tensor
        if self.caching and tensor.is_leaf and tensor.requires_grad:
            if id(tensor) not in self.cache:
                self.cache[id(tensor)] = tensor.to(self.dtype)
            return self.cache[id(tensor)]
        return tensor.to(self.dtype)

    def wrap(self, function: Any) -> Any:
        from torch.utils._pytree import tree_map

        def cast_then_call(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = tree_map(self.cast, (args, kwargs))
            return function(*args, **kwargs)

        return cast_then_call


def meta_autocast(original: Any, autocast: Autocast | None) -> Any:
    """torch.autocast that accepts the meta device (torch has no autocast state for it): there
    it turns the emulated casts off where the code turns CUDA's off, and does nothing else."""

    @contextlib.contextmanager
    def turned_off() -> Iterator[None]:
        assert autocast is not None
        was, autocast.enabled = autocast.enabled, False
        try:
            yield
        finally:
            autocast.enabled = was

    def autocast_for(device_type: str, *args: Any, **kwargs: Any) -> Any:
        if device_type != "meta":
            return original(device_type, *args, **kwargs)
        if autocast is not None and not kwargs.get("enabled", True):
            return turned_off()
        return contextlib.nullcontext()

    return autocast_for


@contextlib.contextmanager
def cuda_behaviour(
    recipe: Recipe, autocast: Autocast | None, host: HostMemory | None = None
) -> Iterator[None]:
    """Patch what runs differently on meta than on CUDA for the replay's duration; offloaded
    activations are counted in `host`."""
    import torch
    import torch.nn.functional as F
    import transformers.masking_utils as masking
    from transformers import PreTrainedModel

    from autotune.training import offload

    flash, efficient = attention_functions()
    original_sdpa = F.scaled_dot_product_attention
    force_flash = ATTENTIONS[recipe.attention].flash

    def sdpa(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):  # noqa: ANN001
        if autocast is not None:
            query, key, value = (autocast.cast(t) for t in (query, key, value))
        half = query.dtype in (torch.float16, torch.bfloat16)
        if attn_mask is None and (force_flash or (half and query.shape[-1] <= 256)):
            return flash.apply(query, key, value)
        if key.shape[1] == query.shape[1]:
            return efficient.apply(query, key, value, attention_bias(query, attn_mask))
        return original_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )

    def attention_bias(query: Any, mask: Any) -> Any:
        """The mask as the memory-efficient kernel gets it: torch makes a boolean mask additive,
        in the query's dtype, before it picks a kernel (a tensor per call, so per layer), and
        pads its last dimension to a multiple of 16."""
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            zero, minus_inf = (
                torch.scalar_tensor(v, dtype=query.dtype, device=mask.device)
                for v in (0.0, float("-inf"))
            )
            mask = torch.where(mask, zero, minus_inf)
        width = mask.shape[-1]
        if width % 16:
            mask = F.pad(mask, (0, 16 - width % 16))[..., :width]
        return mask

    def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002, ANN001
        return torch.native_dropout(input, p, training)[0] if training and p > 0 else input

    def packed_sequences(position_ids: Any) -> Any:
        """transformers' sequence index of each token, without its look at the data."""
        masked = BATCHINGS[recipe.batching].masks(recipe.micro_batch_size)
        if not masked or force_flash:  # flash attention takes the sequences' bounds
            return None
        first = position_ids[:, :1] - 1
        return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)

    original_ignore_causal_mask = masking._ignore_causal_mask_sdpa

    def ignore_causal_mask(padding_mask: Any, *args: Any, **kwargs: Any) -> bool:
        """transformers' test for a mask it may drop, without its look at the data: a padding
        mask the replay passes has padding (replay.padded_rows), so the mask is kept."""
        return padding_mask is None and original_ignore_causal_mask(padding_mask, *args, **kwargs)

    from torch.optim import adam

    patches: list[tuple[Any, str, Any]] = [
        (F, "scaled_dot_product_attention", sdpa),
        # torch's fused AdamW has a meta kernel; only its device check refuses meta tensors
        (adam, "_device_dtype_check_for_fused", lambda *args, **kwargs: None),
        (F, "dropout", dropout),
        # which rows of a batch are packed sequences is read from the data: rows of several
        # sequences for a batching that packs them, one sequence a row otherwise
        (masking, "find_packed_sequence_indices", packed_sequences),
        # as is whether the ids hold padding (GPT-2 checks where no attention mask is passed)
        (PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: None),
        (masking, "_ignore_causal_mask_sdpa", ignore_causal_mask),
        (offload, "host_hooks", (host or HostMemory()).hooks),
        (torch, "autocast", meta_autocast(torch.autocast, autocast)),
    ]
    if autocast is not None:
        for owner, name in ((F, "linear"), (torch, "matmul"), (torch, "bmm"), (torch, "baddbmm")):
            patches.append((owner, name, autocast.wrap(getattr(owner, name))))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextlib.contextmanager
def fresh_bitsandbytes_caches() -> Iterator[None]:
    """bitsandbytes keeps the code map of blockwise quantization in a module dict once made
    (on the device of its first use): empty it for the replay, so the replay makes and keeps it
    as a fresh probe process does, and put back what this process had."""
    import bitsandbytes.functional as bnb_functional

    cached = getattr(bnb_functional, "name2qmap", {})
    kept = dict(cached)
    cached.clear()
    try:
        yield
    finally:
        cached.clear()
        cached.update(kept)
