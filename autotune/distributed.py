"""The ways a recipe may spread one training over several GPUs, each registered once: whether it
shards what each GPU holds, which combinations cannot run (and why), and its names in other
tools' configs. The probes run all of them: torch's DDP and FSDP2, and DeepSpeed's ZeRO engine
where deepspeed is installed (probe_refusal says when it is not).

A recipe's `distributed` names one of these and `num_gpus` how many GPUs (processes) it runs
on; the effective batch (micro-batch x accumulation x num_gpus) is what a study holds fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.optimizers import MAX_GRAD_NORM
from autotune.units import count_of

if TYPE_CHECKING:
    from autotune.recipe import Recipe

DEFAULT_DISTRIBUTED = "none"

DDP_BUCKET_CAP_MB = 25
"""torch's DistributedDataParallel default bucket_cap_mb: gradients are all-reduced in flat
buckets of about this size, together as large as the gradients (gradient_as_bucket_view off)."""


@dataclass(frozen=True)
class DistributedKind:
    name: str
    """The recipe's `distributed` value."""
    shards_states: bool = False
    """Each GPU keeps 1/num_gpus of the parameters, gradients and optimizer states (FSDP,
    ZeRO-3); ZeRO-2 shards gradients and optimizer states only."""
    shards_parameters: bool = False
    deepspeed_stage: int | None = None
    """The ZeRO stage of a DeepSpeed strategy."""

    @property
    def uses_deepspeed(self) -> bool:
        """Whether DeepSpeed's ZeRO engine trains this strategy (else torch's DDP or FSDP2)."""
        return self.deepspeed_stage is not None


DISTRIBUTED: dict[str, DistributedKind] = {
    kind.name: kind
    for kind in (
        DistributedKind("none"),
        DistributedKind("ddp"),
        DistributedKind("fsdp", shards_states=True, shards_parameters=True),
        DistributedKind("deepspeed_zero2", shards_states=True, deepspeed_stage=2),
        DistributedKind(
            "deepspeed_zero3", shards_states=True, shards_parameters=True, deepspeed_stage=3
        ),
    )
}

MAX_GPUS = 1024
"""Past this a num_gpus is a typo."""


def parse_gpu_counts(text: str) -> tuple[int, ...]:
    """--gpus-per-probe: one count (2), a list (1,2,4) or a range (1-4, every count from 1 to
    4); the counts, ascending and each once. Anything else is refused in one line."""
    from autotune.errors import UsageError

    counts: set[int] = set()
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        ends = (low, high if dash else low)
        if not all(e.strip().isdigit() for e in ends) or int(ends[0]) > int(ends[1]):
            counts = set()
            break
        counts.update(range(int(ends[0]), int(ends[1]) + 1))
    if not counts or min(counts) < 1 or max(counts) > MAX_GPUS:
        raise UsageError(
            "--gpus-per-probe takes a count (2), a list (1,2,4) or a range (1-4) of GPUs from "
            f"1 to {MAX_GPUS}, got {text!r}"
        )
    return tuple(sorted(counts))


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on: its affinity set where the OS has one."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _beyond_cpu_cores(processes: int, what: str) -> str:
    """`what` `processes` would do on the CPU, when they are more than the cores this process
    may use ('' where they are not)."""
    cores = usable_cpu_cores()
    if processes <= cores:
        return ""
    return f"{what}, more than the {count_of(cores, 'CPU core')} this process may use"


def cpu_ranks_refusal(ranks: int) -> str:
    """Why `ranks` gloo processes cannot stand in for as many GPUs on the CPU ('' where they
    can): more than its cores, they would take turns on them and time the machine, not the
    recipe."""
    return _beyond_cpu_cores(
        ranks, f"{ranks} gloo processes would stand in for {ranks} GPUs on the CPU"
    )


def cpu_probes_refusal(probes: int) -> str:
    """Why `probes` one-process probes cannot train at once on the CPU ('' where they can):
    more than its cores, they would take turns on them, and each would measure the tokens/s of
    the shared machine rather than its recipe's."""
    return _beyond_cpu_cores(probes, f"{probes} probes would train at once on the CPU")


def cpu_threads_per_process(device: str, workers: int, ranks: int) -> int | None:
    """The threads each process of a probe trains with on the CPU, where `workers` probes of
    `ranks` gloo processes each train at once: the cores this process may use, shared evenly,
    so that each measures its own share rather than contends for every core (torch gives each
    process as many threads as the machine has). None, torch's own count, for a probe of one
    process alone, or on a GPU."""
    processes = workers * ranks
    if not device.startswith("cpu") or processes <= 1:
        return None
    return max(1, usable_cpu_cores() // processes)


def parse_gpu_indices(text: str) -> tuple[str, ...]:
    """--gpus: GPU indices separated by commas (0,1), each a whole number from 0, named once;
    whether this machine has them is checked where the device is known. Anything else (`a`,
    `-1`, an empty one in `0,,1`, `0,0`) is refused in one line that names the value, before
    the run's or training's other checks (which said "needs CUDA" of `--gpus a`)."""
    from autotune.errors import UsageError

    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise UsageError(
            f"--gpus takes GPU indices separated by commas (0,1), each a whole number from 0, "
            f"got {text!r}"
        )
    indices = tuple(str(int(part)) for part in parts)  # 01 and 1 name one GPU
    twice = sorted({index for index in indices if indices.count(index) > 1}, key=int)
    if twice:
        raise UsageError(f"--gpus names GPU {', '.join(twice)} more than once, got {text!r}")
    return indices


def format_gpu_counts(counts: tuple[int, ...]) -> str:
    return ",".join(map(str, counts))


OFFLOADS = ("none", "optimizer", "optimizer_and_params")
"""What a sharded strategy keeps in host memory: nothing; the optimizer states and their step
(ZeRO-Offload); those and the parameter and gradient shards too (FSDP's CPU offload, ZeRO-3's
offload_param)."""


def combination_refusals(recipe: Recipe) -> list[str]:
    """Why a recipe's distributed strategy cannot run with the rest of it (empty: it can)."""
    from autotune.optimizers import OPTIMIZERS

    named = (recipe.distributed, recipe.offload, recipe.optimizer, recipe.quantization)
    if not all(isinstance(value, str) for value in named):
        return []  # the schema check names these (a list cannot be looked up)
    kind = DISTRIBUTED.get(recipe.distributed)
    gpus = recipe.num_gpus
    if kind is None or not isinstance(gpus, int) or isinstance(gpus, bool):
        return []  # the schema check names these
    problems = []
    if kind.name == "none" and gpus != 1:
        problems.append(f"num_gpus {gpus} needs a distributed strategy (ddp, fsdp, deepspeed_*)")
    if kind.name != "none" and gpus < 2:
        problems.append(f"distributed {kind.name} needs num_gpus of 2 or more")
    if recipe.offload != "none" and not kind.shards_states:
        problems.append(f"offload {recipe.offload} needs fsdp or deepspeed, not {kind.name}")
    if kind.name == "fsdp" and recipe.offload == "optimizer":
        # FSDP2's CPUOffloadPolicy offloads the parameter shards, and their gradients and
        # optimizer states with them; it has no optimizer-only offload
        problems.append("offload optimizer with fsdp: FSDP offloads parameters with the optimizer")
    if kind.deepspeed_stage == 2 and recipe.offload == "optimizer_and_params":
        problems.append("offload optimizer_and_params needs deepspeed_zero3 (ZeRO-2 keeps them)")
    if kind.name == "none":
        return problems
    if recipe.quantization != "none" and kind.shards_parameters:
        # bitsandbytes' documented FSDP-QLoRA path stores the 4-bit weights in a float dtype
        # (bnb_4bit_quant_storage) under FSDP1; with the uint8 storage the probes load, FSDP2's
        # fully_shard fails on them or loses their quant state (accelerate issue 3983)
        problems.append(
            f"quantization {recipe.quantization} with {kind.name}: bitsandbytes' quantized "
            "weights (uint8 storage) cannot be sharded by FSDP2 or ZeRO-3"
        )
    optimizer = OPTIMIZERS.get(recipe.optimizer)
    if kind.shards_parameters and optimizer is not None and optimizer.bitsandbytes:
        problems.append(
            f"optimizer {recipe.optimizer} with {kind.name}: bitsandbytes' optimizers update "
            "plain tensors, not sharded ones"
        )
    if recipe.loss != "standard":
        problems.append(
            f"loss {recipe.loss} with {kind.name}: it calls the decoder past the wrapper's "
            "forward, which DDP, FSDP and DeepSpeed need to sync gradients and gather weights"
        )
    if kind.uses_deepspeed and recipe.precision == "amp_fp16":
        problems.append(
            f"precision amp_fp16 with {kind.name}: DeepSpeed scales fp16 losses in its own fp16 "
            "mode (precision fp16), not through torch's GradScaler"
        )
    return problems


def schema_problems(recipe: Recipe) -> list[str]:
    problems = []
    if not isinstance(recipe.distributed, str) or recipe.distributed not in DISTRIBUTED:
        problems.append(
            f"distributed {recipe.distributed!r} is not one of {', '.join(DISTRIBUTED)}"
        )
    if recipe.offload not in OFFLOADS:
        problems.append(f"offload {recipe.offload!r} is not one of {', '.join(OFFLOADS)}")
    gpus = recipe.num_gpus
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= MAX_GPUS:
        problems.append(f"num_gpus must be an integer from 1 to {MAX_GPUS}, got {gpus!r}")
    return problems + combination_refusals(recipe)


DEEPSPEED_INSTALL = "pip install 'autotune[deepspeed]'"


def deepspeed_installed() -> bool:
    """Whether deepspeed can be imported (looked up, not imported: it loads torch)."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def probe_refusal(recipe: Recipe) -> str:
    """Why autotune cannot probe this recipe's strategy ('' where it can)."""
    kind = DISTRIBUTED[recipe.distributed]
    if kind.uses_deepspeed and not deepspeed_installed():
        return f"distributed {recipe.distributed} needs DeepSpeed installed ({DEEPSPEED_INSTALL})"
    return ""


def replay_refusal(recipe: Recipe) -> str:
    """Why the replay leaves this recipe's per-GPU peak to the formula ('' where it replays)."""
    if DISTRIBUTED[recipe.distributed].uses_deepspeed:
        # deepspeed.initialize allocates its flat partitions on a real accelerator
        return (
            f"{recipe.distributed} is predicted per GPU by the formula, 16-bit model states by "
            "DeepSpeed's estimators where installed (the replay runs FSDP2, not DeepSpeed)"
        )
    if recipe.num_gpus > 1 and recipe.distributed != "fsdp":
        return f"{recipe.distributed} is predicted per GPU by the formula (FSDP is replayed)"
    if recipe.offload != "none":
        return "offload is predicted by the formula (a replay would hold the host's share)"
    return ""


def label_part(recipe: Recipe) -> str:
    """'fsdp x4' for a distributed recipe, '' otherwise."""
    if recipe.distributed == DEFAULT_DISTRIBUTED:
        return ""
    offload = "" if recipe.offload == "none" else f" offload-{recipe.offload.replace('_', '-')}"
    return f"{recipe.distributed.replace('deepspeed_', '')} x{recipe.num_gpus}{offload}"


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed JSON of a ZeRO recipe, "auto" where the HF integration fills values in."""
    stage = DISTRIBUTED[recipe.distributed].deepspeed_stage
    config: dict[str, Any] = {
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        # as the probes train; "auto" would take the Trainer's max_grad_norm, 1.0 by default
        "gradient_clipping": MAX_GRAD_NORM,
    }
    if stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    host = {"device": "cpu", "pin_memory": True}
    if recipe.offload != "none":
        config["zero_optimization"]["offload_optimizer"] = dict(host)
    if recipe.offload == "optimizer_and_params":
        config["zero_optimization"]["offload_param"] = dict(host)
    return config


FSDP2_KEYS = {"reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
"""FSDP2 as the probes shard: each decoder block a unit (transformers and axolotl find the block
class from the model's _no_split_modules), parameters resharded after forward."""


def hf_training_keys(recipe: Recipe) -> dict[str, Any]:
    """TrainingArguments keywords of the strategy (fsdp_config keys as its docstring lists)."""
    kind = DISTRIBUTED[recipe.distributed]
    if kind.name == "ddp":
        return {"ddp_bucket_cap_mb": DDP_BUCKET_CAP_MB}
    if kind.name == "fsdp":
        offload = {"cpu_offload": True} if recipe.offload != "none" else {}
        return {"fsdp": True, "fsdp_config": {"version": 2, **FSDP2_KEYS, **offload}}
    if kind.uses_deepspeed:
        return {"deepspeed": deepspeed_config(recipe)}  # a dict is accepted as well as a path
    return {}


def axolotl_keys(recipe: Recipe) -> dict[str, Any]:
    """axolotl's fsdp_version/fsdp_config, or deepspeed naming the JSON it ships (the config
    itself with offload, which no shipped file matches for every case)."""
    kind = DISTRIBUTED[recipe.distributed]
    if kind.name == "fsdp":
        offload = {"offload_params": True} if recipe.offload != "none" else {}
        return {"fsdp_version": 2, "fsdp_config": {**FSDP2_KEYS, **offload}}
    if kind.uses_deepspeed:
        if recipe.offload != "none":  # its deepspeed takes a mapping as well as a path
            return {"deepspeed": deepspeed_config(recipe)}
        return {"deepspeed": f"deepspeed_configs/zero{kind.deepspeed_stage}.json"}
    return {}


def llamafactory_keys(recipe: Recipe) -> dict[str, Any]:
    """LLaMA-Factory's deepspeed, naming the JSON it ships (FSDP goes by its launch)."""
    stage = DISTRIBUTED[recipe.distributed].deepspeed_stage
    offload = "_offload" if recipe.offload != "none" else ""
    return {"deepspeed": f"examples/deepspeed/ds_z{stage}{offload}_config.json"} if stage else {}


ACCELERATE_TYPES = {
    "none": "NO",
    "ddp": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}
"""accelerate's distributed_type of each strategy."""


def accelerate_keys(recipe: Recipe) -> dict[str, Any]:
    """The strategy's part of an `accelerate launch` config (ClusterConfig's keys, as `accelerate
    config` writes them)."""
    kind = DISTRIBUTED[recipe.distributed]
    keys: dict[str, Any] = {
        "distributed_type": ACCELERATE_TYPES[kind.name],
        "num_processes": recipe.num_gpus,
        "num_machines": 1,
        "machine_rank": 0,
    }
    if kind.name == "fsdp":
        keys["fsdp_config"] = {"fsdp_version": 2} | {f"fsdp_{k}": v for k, v in FSDP2_KEYS.items()}
        keys["fsdp_config"]["fsdp_offload_params"] = recipe.offload != "none"
    if kind.uses_deepspeed:
        keys["deepspeed_config"] = {
            "zero_stage": kind.deepspeed_stage,
            "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
            # accelerate's DeepSpeedPlugin fields; without them it offloads nothing
            "offload_optimizer_device": "cpu" if recipe.offload != "none" else "none",
            "offload_param_device": "cpu" if recipe.offload == "optimizer_and_params" else "none",
            "gradient_clipping": MAX_GRAD_NORM,
        }
    return keys


def launch_line(recipe: Recipe, fmt: str, mixed_precision: str | None = None) -> str:
    """How the exported config is started on num_gpus GPUs ('' for one). `mixed_precision`:
    accelerate launch's, over its config file's (LLaMA-Factory's fsdp2_config.yaml says bf16, a
    default config may), which the Trainer takes where its own bf16/fp16 are off
    (TrainingArguments.mixed_precision); None: the config's."""
    if recipe.distributed == DEFAULT_DISTRIBUTED:
        return ""
    gpus = recipe.num_gpus
    plain = f" --mixed_precision {mixed_precision}" if mixed_precision else ""
    if fmt == "llamafactory":
        if recipe.distributed == "fsdp":
            return (
                f"accelerate launch --num_processes {gpus}{plain} --config_file "
                "examples/accelerate/fsdp2_config.yaml src/train.py CONFIG"
            )
        return f"FORCE_TORCHRUN=1 NPROC_PER_NODE={gpus} llamafactory-cli train CONFIG"
    if fmt == "accelerate":
        return "accelerate launch --config_file THIS_FILE YOUR_TRAINING_SCRIPT"
    if fmt == "axolotl":
        return f"accelerate launch --num_processes {gpus} -m axolotl.cli.train CONFIG"
    return f"accelerate launch --num_processes {gpus}{plain} YOUR_TRAINING_SCRIPT"
