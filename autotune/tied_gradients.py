"""Autograd's sum of a tensor's gradients, as it runs on a plain device, for the allocation
followers of the replay (autotune.meta_recorder) and of the CPU step trace
(autotune.step_trace).

A tensor used twice gets one gradient from each use; autograd's engine sums them in its
InputBuffer, in place into the first when that one is dense and its storage held by the engine
alone (input_buffer.cpp, `can_accumulate_inplace`). A parameter the model holds under two
names (an embedding tied to the LM head) gets one from each: under AMP the head's fp32
gradient is a fresh cast, so the sum makes no block. So does a hidden state that autocast
casts once for each projection that reads it (Qwen2's MLP input, for its gate and up
projections: two fresh fp32 gradients). Under a torch dispatch mode, and on the meta device (a
"tensor subclass" to autograd), the engine sums out of place instead, one more block of the
gradient for a moment: the followers make that sum in place where CUDA's would be, the
replay for any gradient its backward sums, the step trace for the tied parameters'.
"""

from __future__ import annotations

from typing import Any

SharedShapes = frozenset[tuple[tuple[int, ...], Any]]


def tied_gradient_shapes(model: Any) -> SharedShapes:
    """(shape, dtype) of each trainable parameter `model` holds under more than one name."""
    seen: set[int] = set()
    tied = set()
    for _, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.requires_grad:
            if id(parameter) in seen:
                tied.add((tuple(parameter.shape), parameter.dtype))
            seen.add(id(parameter))
    return frozenset(tied)


def sums_in_place(
    func: Any, args: tuple, kwargs: dict | None, tied: SharedShapes, backward: bool = False
) -> bool:
    """Whether `func(*args, **kwargs)` is the engine's sum of two gradients (outside autograd,
    of one shape and dtype: in `backward`, of any tensor; otherwise of a tied parameter) that a
    plain device makes in place into the first: dense, not a view, its storage referenced by it
    alone."""
    import torch

    if not (tied or backward) or func is not torch.ops.aten.add.Tensor or kwargs:
        return False
    if len(args) != 2:
        return False
    first, second = args
    if torch.is_grad_enabled() or not isinstance(second, torch.Tensor):
        return False
    if not backward and (tuple(first.shape), first.dtype) not in tied:
        return False
    if second.shape != first.shape or second.dtype != first.dtype or first._base is not None:
        return False
    storage = first.untyped_storage()
    # one reference is the tensor's, the other the storage object just read
    return _dense(first) and torch._C._storage_Use_Count(storage._cdata) == 2


def _dense(tensor: Any) -> bool:
    """Whether `tensor` covers its elements without gaps or overlaps, in any dimension order."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda d: d[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True
