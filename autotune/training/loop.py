"""The step loop and what it measures: tokens per second, loss, eval loss, peak memory.

One optimizer step consumes one effective batch split into micro-batches; each micro-batch's
loss is weighted by its share of the step's trained tokens, so the update is the same whatever
the micro-batch size (only speed and memory change).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from autotune.batchings import BATCHINGS
from autotune.data.tokens import IGNORE_INDEX, TokenizedExample
from autotune.precisions import PRECISIONS
from autotune.recipe import Recipe
from autotune.training.batching import collate, collate_packed, collate_padding_free, pack_rows
from autotune.training.build import autocast_dtype
from autotune.training.deepspeed_engine import is_engine
from autotune.training.host_held import current_rss_bytes, peak_rss_bytes
from autotune.training.io import CPU_MEMORY_SOURCE, CUDA_MEMORY_SOURCE
from autotune.training.loss import causal_lm_loss


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the recipe diverged (often fp16 overflow)."""


@dataclass(frozen=True)
class StepRecord:
    tokens: int
    """Non-padding tokens processed in the step."""
    seconds: float
    """Wall time of the step, batch assembly and host-device copies included."""
    loss: float


def warmup_steps(steps: int) -> int:
    """Steps left out of the throughput: kernel selection, allocator growth, lazy states."""
    return 0 if steps <= 1 else 1 if steps <= 4 else 2


def tokens_per_second(records: Sequence[StepRecord]) -> float:
    """Median over the steps after warm-up of tokens / seconds."""
    measured = records[warmup_steps(len(records)) :] or records
    return statistics.median(r.tokens / r.seconds for r in measured)


def timed_steps(records: Sequence[StepRecord]) -> int:
    """How many steps `tokens_per_second` is the median of: none where the one step run is
    its own warm-up, which `train` then reports no speed for rather than the cold step's."""
    return len(records) - warmup_steps(len(records)) if len(records) > 1 else 0


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _to_tensors(batch: dict[str, list[list[int]]], device: str) -> dict[str, Any]:
    import torch

    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def micro_batches(examples: Sequence[TokenizedExample], recipe: Recipe) -> list[list[Any]]:
    """The passes of one step: micro_batch_size examples each, or with batching packed,
    micro_batch_size packed rows each (a row: the examples packed into it)."""
    units: Sequence[Any] = (
        pack_rows(examples, recipe.seq_len) if BATCHINGS[recipe.batching].packs_rows else examples
    )
    size = recipe.micro_batch_size
    return [list(units[start : start + size]) for start in range(0, len(units), size)]


def _examples_of(micro: list[Any], recipe: Recipe) -> list[TokenizedExample]:
    return [e for row in micro for e in row] if BATCHINGS[recipe.batching].packs_rows else micro


def model_inputs(
    examples: Sequence[Any], recipe: Recipe, device: str, pad_token_id: int
) -> tuple[dict[str, Any], int]:
    """The forward's keyword arguments for a micro-batch (its examples, or with batching
    packed its packed rows), and its real (non-padding) tokens."""
    batching = BATCHINGS[recipe.batching]
    if batching.packs_rows:
        rows: Sequence[Sequence[TokenizedExample]] = examples
        batch = _to_tensors(collate_packed(rows, pad_token_id), device)
        return batch, sum(len(e.input_ids) for row in rows for e in row)
    if not batching.one_row:
        batch = _to_tensors(collate(examples, pad_token_id), device)
        return batch, int(batch["attention_mask"].sum())
    # No attention mask: from positions that restart at 0, transformers builds the
    # block-diagonal causal mask (or flash-attention's sequence bounds) itself, so no sequence
    # attends to another (tests/test_batching.py checks the loss against a padded batch).
    batch = _to_tensors(collate_padding_free(examples), device)
    return batch, int(batch["input_ids"].numel())


def _autocast(recipe: Recipe, device: str) -> Any:
    """bf16/fp16 autocast for the amp_* precisions; nothing for weights stored in half."""
    amp_dtype = autocast_dtype(recipe)
    if amp_dtype is None:
        return nullcontext()
    import torch

    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=amp_dtype)


def _loss_tokens(example: TokenizedExample) -> int:
    # The model shifts labels by one: the first label never carries loss.
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


class MemoryMeter:
    """Peak memory of this process: the CUDA allocator's reserved bytes, or RSS growth on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.context_bytes = 0
        self.baseline_rss_bytes = 0
        if device.startswith("cuda"):
            import torch

            torch.cuda.init()
            torch.zeros(1, device=device)  # creates the context
            free, total = torch.cuda.mem_get_info()
            self.total_bytes = total
            self.context_bytes = cuda_context_bytes(total - free)
            torch.cuda.reset_peak_memory_stats()
        else:
            # Load the libraries first so their code and tables are not counted as the recipe's.
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
            import transformers  # noqa: F401
            from transformers import AutoModelForCausalLM  # noqa: F401
        self.baseline_rss_bytes = current_rss_bytes()

    @property
    def source(self) -> str:
        return CUDA_MEMORY_SOURCE if self.device.startswith("cuda") else CPU_MEMORY_SOURCE

    def enforce_budget(self, budget_bytes: int) -> bool:
        """Cap this process's allocator at the budget less the context; True when capped."""
        if not self.device.startswith("cuda"):
            return False
        import torch

        fraction = (budget_bytes - self.context_bytes) / self.total_bytes
        if fraction >= 1:
            return False
        torch.cuda.set_per_process_memory_fraction(max(fraction, 0.0))
        return True

    def peak_bytes(self) -> tuple[int, int | None]:
        """(peak the budget is compared with, peak allocated where known)."""
        if self.device.startswith("cuda"):
            import torch

            return (
                torch.cuda.max_memory_reserved() + self.context_bytes,
                torch.cuda.max_memory_allocated(),
            )
        return self.rss_growth_bytes(), None

    def rss_growth_bytes(self) -> int:
        """Growth of the process's peak resident set since the meter was made: host memory
        of every kind (on CUDA after the context and libraries, on the CPU after the libraries)."""
        return max(peak_rss_bytes() - self.baseline_rss_bytes, 0)


def cuda_context_bytes(device_used_bytes: int) -> int:
    """GPU memory this process holds outside PyTorch's allocator (CUDA context, libraries).

    NVML's per-process figure counts this process alone, so other processes on the same GPU
    (another probe, a notebook, the study itself) do not inflate it. Without NVML (no
    nvidia-ml-py, or a container that hides process ids) the device-wide figure is used, which
    is right while this process is the GPU's only user.
    """
    import os

    import torch

    reserved = torch.cuda.memory_reserved()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            )
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == os.getpid() and process.usedGpuMemory:
                    return max(int(process.usedGpuMemory) - reserved, 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML is an improvement, never a requirement
        pass
    return max(device_used_bytes - reserved, 0)


def train_steps(
    model: Any,
    optimizer: Any,
    step_examples: Iterable[Sequence[TokenizedExample]],
    recipe: Recipe,
    device: str,
    pad_token_id: int,
    on_step: Callable[[int, StepRecord], None] | None = None,
    after_update: Callable[[], None] | None = None,
) -> list[StepRecord]:
    """Run one optimizer step per entry of `step_examples`; stop with NonFiniteLoss on NaN.
    `after_update` is called after each optimizer step, before the gradients are let go."""
    import torch

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    scaling = PRECISIONS[recipe.precision].scales_loss
    scaler = torch.amp.GradScaler(device_type) if scaling else None
    engine = model if is_engine(model) else None  # DeepSpeed: its backward, its step
    records: list[StepRecord] = []
    model.train()
    for step, examples in enumerate(step_examples):
        _synchronize(device)
        started = time.perf_counter()
        step_loss_tokens = sum(_loss_tokens(e) for e in examples) or 1
        loss_total = 0.0
        tokens = 0
        passes = micro_batches(examples, recipe)
        for index, micro in enumerate(passes):
            batch, real_tokens = model_inputs(micro, recipe, device, pad_token_id)
            tokens += real_tokens
            share = sum(_loss_tokens(e) for e in _examples_of(micro, recipe)) / step_loss_tokens
            # DDP all-reduces the gradients once per step, after the last micro-batch
            last = index == len(passes) - 1
            if engine is not None:  # ZeRO reduces its gradient partitions at the boundary
                engine.set_gradient_accumulation_boundary(last)
            plain = last or engine is not None or not hasattr(model, "no_sync")
            with nullcontext() if plain else model.no_sync():
                with _autocast(recipe, device):
                    loss = causal_lm_loss(model, batch, recipe) * share
                if engine is not None:  # the loss is already this micro-batch's share
                    engine.backward(loss, scale_wrt_gas=False)
                else:
                    (scaler.scale(loss) if scaler else loss).backward()
            loss_total += float(loss.detach())
        if not math.isfinite(loss_total):
            raise NonFiniteLoss(f"loss is {loss_total} at step {step}")
        if engine is not None:
            engine.step()  # the optimizer's step and zero_grad
        elif scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        counting_seconds = 0.0  # what after_update takes is not the step's
        if after_update:
            counting = time.perf_counter()
            after_update()
            counting_seconds = time.perf_counter() - counting
        if engine is None:
            optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        seconds = time.perf_counter() - started - counting_seconds
        record = StepRecord(tokens=tokens, seconds=seconds, loss=loss_total)
        records.append(record)
        if on_step:
            on_step(step, record)
    return records


def evaluate(
    model: Any,
    examples: Sequence[TokenizedExample],
    recipe: Recipe,
    device: str,
    pad_token_id: int,
) -> float:
    """Mean loss per answer token over `examples` (token-weighted, so batching does not matter)."""
    return mean_eval_loss(*eval_loss_sum(model, examples, recipe, device, pad_token_id))


def eval_loss_sum(
    model: Any,
    examples: Sequence[TokenizedExample],
    recipe: Recipe,
    device: str,
    pad_token_id: int,
) -> tuple[float, int]:
    """The loss summed over the answer tokens of `examples`, and how many there are: sums of
    parts of a split add up to the split's."""
    import torch

    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for micro in micro_batches(examples, recipe):
            batch, _ = model_inputs(micro, recipe, device, pad_token_id)
            count = sum(_loss_tokens(e) for e in _examples_of(micro, recipe))
            with _autocast(recipe, device):
                loss = causal_lm_loss(model, batch, recipe)
            total_loss += float(loss) * count
            total_tokens += count
    model.train()
    return total_loss, total_tokens


def mean_eval_loss(total_loss: float, total_tokens: int) -> float:
    mean = total_loss / max(total_tokens, 1)
    if not math.isfinite(mean):
        raise NonFiniteLoss(f"eval loss is {mean}")
    return mean


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
