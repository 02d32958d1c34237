"""What a probe is asked to do and what it reports, as JSON files between parent and child."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autotune.files import write_atomically
from autotune.recipe import Recipe

ProbeStatus = Literal["ok", "oom", "nan", "timeout", "crash"]

CUDA_MEMORY_SOURCE = "cuda_max_reserved"
"""torch.cuda.max_memory_reserved() over train and eval, plus the CUDA context."""
CPU_MEMORY_SOURCE = "cpu_peak_rss_delta"
"""Growth of the process's peak resident set from before the model loads (CPU runs only)."""


def measured_memory(peak_bytes: float, memory_source: str) -> str:
    """A probe's measured peak as it was measured: a CPU probe's is the growth of its resident
    memory, not GPU memory."""
    from autotune.units import format_bytes

    memory = format_bytes(peak_bytes)
    return f"CPU RSS +{memory}" if memory_source == CPU_MEMORY_SOURCE else memory


PROBE_PHASES = ("start", "device_init", "data", "load", "prepare", "warmup", "steps", "eval")
"""Where a probe's time goes, in order (ProbeResult.seconds, plus "total"): interpreter start
(or fork), CUDA and memory meter set-up, tokenized data, reading and quantizing the base
weights, adapters/freezing/checkpointing and the optimizer, warm-up steps, measured steps, eval."""


@dataclass(frozen=True)
class ProbeRequest:
    recipe: Recipe
    data_path: str
    steps: int
    device: str
    budget_bytes: int
    seed: int
    visible_gpu: str | None = None
    """With several GPUs, the one this probe may use (CUDA_VISIBLE_DEVICES)."""
    token_cache: str | None = None
    """Tokenized splits built once by the study for this data, tokenizer, seq_len and seed."""
    eval_rows: int | None = None
    """Rows held out for eval loss; None: a tenth of the data, at most 64."""
    weight_cache: str | None = None
    """Directory for an NF4-quantized copy of the base weights (QLoRA probes load from it,
    the first one writes it); None: always load and quantize the original weights."""
    eval_at_steps: tuple[int, ...] = ()
    """Also measure eval loss after these steps (ProbeResult.eval_losses): the probe's learning
    rate is constant, so its state there is a shorter probe's with the same seed."""
    quality: str = "eval_loss"
    """The third objective (autotune.quality): with a task metric the probe also generates."""
    pad_token_id: int | None = None
    """The id the study checked padding with against the model's vocab_size (None: the
    tokenizer's own)."""
    cpu_threads: int | None = None
    """On the CPU, the threads each process of the probe trains with (torch.set_num_threads),
    where processes train at once (distributed.cpu_threads_per_process); None: torch's own
    count, every core."""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["recipe"] = self.recipe.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ProbeRequest:
        data = json.loads(text)
        data["recipe"] = Recipe.from_dict(data["recipe"])
        data["eval_at_steps"] = tuple(data.get("eval_at_steps", ()))
        return cls(**data)


@dataclass
class ProbeResult:
    status: ProbeStatus
    reason: str = ""
    device: str = ""
    memory_source: str = ""
    peak_memory_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    cuda_context_bytes: int | None = None
    host_peak_bytes: int | None = None
    """Where the recipe offloads (activations, optimizer, FSDP shards): the host memory its
    offloading held at the peak, counted from the tensors held (training.host_held); None
    where it offloads nothing."""
    host_rss_growth_bytes: int | None = None
    """Where the recipe offloads: the growth of the process's peak resident set over the
    probe, everything it loaded included (a coarse check of host_peak_bytes)."""
    tokens_per_second: float | None = None
    eval_loss: float | None = None
    eval_losses: dict[str, float] = field(default_factory=dict)
    """Step (as text: JSON keys) -> eval loss, for the request's eval_at_steps."""
    quality_score: float | None = None
    """The task metric's mean over the eval prompts, where the request's quality is one."""
    train_loss: float | None = None
    steps_done: int = 0
    trained_tokens: int = 0
    budget_enforced: bool = False
    forked: bool = False
    """Forked from the warm probe server (imports already done) rather than a new interpreter."""
    cpu_threads: int | None = None
    """On the CPU, the threads the probe trained with (torch.get_num_threads()), each of its
    processes where it has several; None on a GPU."""
    weights: str = ""
    """Where the base weights came from: "original", "nf4 cache" or "original, nf4 cache
    written"."""
    seconds: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of every optimizer step, warm-up included: how steady the throughput was."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        return cls(**json.loads(text))

    def write(self, path: str | Path) -> None:
        write_atomically(path, self.to_json())  # the parent never reads half a result
