"""What CUDA allocates that the meta device does not, emulated for the replay (autotune.replay):
the ops, kernels and library calls that run differently on meta tensors than on CUDA ones.

- SDPA picks its kernel as on CUDA: flash attention for fp16/bf16 without a mask (output and a
  fp32 log-sum-exp saved; fp32 dq accumulator in backward), the memory-efficient kernel
  where the heads match (transformers repeats grouped key heads under a mask), which also
  keeps the additive mask torch makes of a boolean one at each call, the math path (the real
  ops) otherwise (the kernels' memory is autotune.meta_attention's);
- SDPA's math path adds the mask to the scores in place, as on CUDA (torch adds out of place
  for meta tensors, which it treats as tensor subclasses: one more score matrix);
- softmax's backward (SDPA's math path, eager attention) holds a temporary of the gradient's
  size beside its output, as CUDA's kernel does (`grad * output`): under an attention matrix,
  one more matrix at the step's peak;
- dropout keeps a one-byte mask (CUDA's native_dropout), not the CPU's full-size one;
- amp precisions cast the inputs of matrix multiplies to bf16/fp16 above autograd, caching the
  casts of trainable weights over the forward, as torch.autocast does;
- the ops that run on cuBLAS tell autotune.meta_cublas when a thread first multiplies (its
  workspace is taken then);
- torch.cuda.empty_cache() gives the allocator's unused segments back;
- torch's fused AdamW runs on meta tensors (its meta kernel exists; its device check is lifted);
- what transformers reads from the data to choose a mask is answered from the recipe.

bitsandbytes' ops are autotune.meta_bitsandbytes' and autotune.meta_int8's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from autotune.allocator import CachingAllocator
from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.meta_attention import attention_functions
from autotune.meta_host import HostMemory
from autotune.meta_patches import patched
from autotune.recipe import Recipe


class _MathAttention(threading.local):
    running = False
    """Whether SDPA's math path runs (cuda_behaviour's sdpa): its mask add is made in place."""


MATH_ATTENTION = _MathAttention()


def cuda_kernels(
    track: Callable[[Any], None], multiplied: Callable[[], None] = lambda: None
) -> dict[Any, Callable[..., Any]]:
    """Replacements for ops whose meta kernels allocate less than CUDA's, by op: each makes
    (and passes to `track`) what the CUDA kernel makes, and returns its outputs. The ops that
    run on cuBLAS call `multiplied` after their output is made (meta_cublas.CublasWorkspaces')."""
    import torch
    from torch.utils._pytree import tree_leaves

    def safe_softmax(scores: Any, dim: int, dtype: Any = None) -> Any:
        """SDPA's math-path softmax as CUDA runs it (the meta kernel makes only the output):
        the softmax, then rows that are all -inf zeroed in place through a mask of them."""
        out = torch.softmax(scores, dim, dtype=dtype)
        track(out)
        masked = scores.isneginf()
        track(masked)
        rows = torch.all(masked, dim=dim, keepdim=True)
        track(rows)
        return out

    def add(a: Any, b: Any, alpha: Any = 1) -> Any:
        """SDPA's math path adds the mask to the scores in place on CUDA; on meta tensors, which
        torch counts as tensor subclasses (areAnyTensorSubclassLike), it adds out of place: one
        more score matrix, alive beside the softmax's output."""
        if (
            MATH_ATTENTION.running
            and isinstance(b, torch.Tensor)
            and torch.broadcast_shapes(a.shape, b.shape) == a.shape
            and torch.result_type(a, b) == a.dtype
        ):
            return a.add_(b, alpha=alpha)
        out = torch.ops.aten.add.Tensor(a, b, alpha=alpha)
        track(out)
        return out

    def softmax_backward(grad: Any, output: Any, dim: int, input_dtype: Any) -> Any:
        """Softmax's backward as CUDA runs it (softmax_backward_cuda_out): its output, then
        `grad * output` in a temporary of the gradient's size, alive through the kernel. Under
        an attention matrix (SDPA's math path, eager attention) that is one more matrix beside
        the probabilities, their gradient and the output."""
        out = torch.ops.aten._softmax_backward_data.default(grad, output, dim, input_dtype)
        track(out)
        track(grad * output)
        return out

    def grouped_mm(
        mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: Any = None
    ) -> Any:
        """The stacked experts' matmul as CUDA runs it for any dtype (bf16 takes the grouped
        kernel, others a loop of matmuls into the one output); the meta kernel takes bf16 only,
        and amp precisions keep the experts in fp32. Only the output is allocated."""

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
        track(out)
        return out

    def on_cublas(op: Any) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            out = op(*args, **kwargs)
            for tensor in tree_leaves(out):
                track(tensor)
            multiplied()
            return out

        return run

    kernels: dict[Any, Callable[..., Any]] = {
        torch.ops.aten._safe_softmax.default: safe_softmax,
        torch.ops.aten._softmax_backward_data.default: softmax_backward,
        torch.ops.aten._grouped_mm.default: grouped_mm,
        torch.ops.aten.add.Tensor: add,
    }
    aten = torch.ops.aten
    for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv, aten.addmv):
        kernels[op.default] = on_cublas(op.default)
    return kernels


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

    def cast_last_first(self, tensors: Sequence[Any]) -> list[Any]:
        """`tensors` cast in the order torch's autocast casts a call's arguments: its wrapper
        expands `cached_cast(args)...` into the call of the op (ATen/autocast_mode.h), whose
        arguments the compiler evaluates last first. A linear's weight is cast before its
        input, so backward (the engine runs the ready node made last first) makes the input's
        gradient before the weight's."""
        return [self.cast(tensor) for tensor in reversed(tensors)][::-1]

    def wrap(self, function: Any) -> Any:
        from torch.utils._pytree import tree_flatten, tree_unflatten

        def cast_then_call(*args: Any, **kwargs: Any) -> Any:
            leaves, spec = tree_flatten((args, kwargs))
            args, kwargs = tree_unflatten(self.cast_last_first(leaves), spec)
            return function(*args, **kwargs)

        return cast_then_call


@contextlib.contextmanager
def autocast_forward(autocast: Autocast | None) -> Iterator[None]:
    """One forward under `autocast`: casts of trainable leaves are cached while it runs, and the
    cache goes with it, as torch.autocast's does."""
    if autocast is None:
        yield
        return
    autocast.caching = True
    try:
        yield
    finally:
        autocast.cache.clear()
        autocast.caching = False


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
            query, key, value = autocast.cast_last_first((query, key, value))
        half = query.dtype in (torch.float16, torch.bfloat16)
        if attn_mask is None and (force_flash or (half and query.shape[-1] <= 256)):
            return flash.apply(query, key, value)
        if key.shape[1] == query.shape[1]:
            return efficient.apply(query, key, value, attention_bias(query, attn_mask))
        MATH_ATTENTION.running = True
        try:
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
        finally:
            MATH_ATTENTION.running = False

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

    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.optim import adam

    patches: list[tuple[Any, str, Any]] = [
        (
            BaseTunerLayer,
            "_move_adapter_to_device_of_base_layer",
            adapter_in_base_dtype(BaseTunerLayer._move_adapter_to_device_of_base_layer),
        ),
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
    with patched(patches):
        yield


def adapter_in_base_dtype(move: Callable[..., Any]) -> Callable[..., Any]:
    """peft's move of a new adapter to its base layer as it runs on CUDA. peft casts the
    adapter to the base layer's float dtype (a 4-bit layer's compute dtype: bf16 for QLoRA),
    but leaves an adapter on meta as it is, in fp32. DoRA's init (the weight's norm, from
    `lora_B @ lora_A` and the dequantized weight) runs in the adapter's dtype before peft
    upcasts the adapter to fp32: on Qwen2-7B's MLP three 129.5 MiB blocks on CUDA, 259 MiB
    ones in a replay that kept fp32."""
    import torch

    def in_base_dtype(layer: Any, adapter_name: str, device: Any = None) -> None:
        move(layer, adapter_name, device)
        base = layer.get_base_layer()
        base = (
            getattr(base, "out_proj", base)
            if isinstance(base, torch.nn.MultiheadAttention)
            else base
        )
        _, dtype = layer._get_base_layer_device_and_dtype(base)
        if dtype is None or not dtype.is_floating_point:
            return
        for name in (*layer.adapter_layer_names, *layer.other_param_names):
            adapters = getattr(layer, name, None)
            if not isinstance(adapters, torch.nn.ModuleDict) or adapter_name not in adapters:
                continue
            params = list(adapters[adapter_name].parameters())
            if params and all(p.is_meta and p.dtype.is_floating_point for p in params):
                adapters[adapter_name] = adapters[adapter_name].to(dtype=dtype)

    return in_base_dtype


def cuda_empty_cache(allocator: CachingAllocator) -> Any:
    """torch.cuda.empty_cache() where the probe's model preparation calls it (after peft's
    upcasts), on the allocator model: its unused segments given back."""
    from autotune.training import build

    return patched([(build, "release_cached_memory", allocator.empty_cache)])
