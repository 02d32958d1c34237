"""The probe's optimizer on the meta device as it runs on CUDA, for the replay
(autotune.replay): fused or foreach AdamW as the registry names it, paged states in CUDA
unified memory (outside the caching allocator), host states in the replay's host memory.
"""

from __future__ import annotations

from typing import Any

from autotune.meta_host import HostMemory
from autotune.meta_recorder import Recorder
from autotune.optimizers import OPTIMIZERS, PAGED_MIN_ELEMENTS
from autotune.recipe import Recipe


def cuda_optimizer(
    model: Any, recipe: Recipe, recorder: Recorder, host: HostMemory
) -> tuple[Any, list[int]]:
    """The probe's optimizer as it runs on CUDA: torch's AdamW fused or foreach as the registry
    names it, paged states kept out of the allocator (their bytes, one a state buffer, are
    returned beside it), host states counted in `host`."""
    from autotune.training.build import build_optimizer, trainable_parameters

    kind = OPTIMIZERS[recipe.optimizer]
    if kind.host_states:
        return host.offload_optimizer(trainable_parameters(model), recipe.learning_rate), []
    optimizer = build_optimizer(model, recipe)
    paged: list[int] = []
    if kind.fused:  # the meta device has the fused kernel too (cuda_behaviour lets it run)
        for group in optimizer.param_groups:
            group.update(fused=True, foreach=False)
    elif kind.step_temporaries:
        for group in optimizer.param_groups:
            group["foreach"] = True
    elif kind.paged:
        import torch

        def state_buffer(A, dtype=torch.float32):  # noqa: ANN001, N803
            if A.numel() < PAGED_MIN_ELEMENTS:
                return torch.zeros_like(A, dtype=dtype, device=A.device)
            with recorder.pause():
                buffer = torch.zeros_like(A, dtype=dtype, device=A.device)
            paged.append(buffer.numel() * buffer.element_size())
            return buffer

        optimizer.get_state_buffer = state_buffer
    return optimizer, paged
