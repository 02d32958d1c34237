"""Recipes on several GPUs: the keys, the space, the per-GPU memory model, and real DDP and FSDP2
probes, with gloo processes standing in for the GPUs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import yaml

import autotune.probe as probe_module
from autotune import distributed
from autotune.errors import UsageError
from autotune.memory import estimate
from autotune.model_spec import load_model_spec
from autotune.probe import SubprocessProbeRunner
from autotune.recipe import Recipe
from autotune.space import SearchSpace
from autotune.study.pruning import distributed_space
from autotune.training.io import ProbeResult
from tests.conftest import ROOT, SHAPE_CONFIGS, write_jsonl
from tests.test_probe import request_for
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401

DEMO_SPACE = ROOT / "autotune" / "search_spaces" / "demo.yaml"
FULL = {"method": "full", "precision": "bf16", "micro_batch_size": 1, "seq_len": 1024}


def test_defaults_leave_recipes_as_they_were_and_keys_round_trip():
    single = Recipe.from_dict({"method": "full"})
    assert "distributed" not in single.to_dict() and "num_gpus" not in single.to_dict()
    sharded = Recipe.from_dict({**FULL, "distributed": "fsdp", "num_gpus": 4})
    assert Recipe.from_yaml(sharded.to_yaml()) == sharded
    assert sharded.to_dict()["distributed"] == "fsdp" and sharded.effective_batch_size == 4
    assert "fsdp x4" in sharded.label()


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"num_gpus": 2}, "num_gpus 2 needs a distributed strategy"),
        ({"distributed": "ddp"}, "needs num_gpus of 2 or more"),
        ({"distributed": "zero9", "num_gpus": 2}, "distributed 'zero9' is not one of"),
        (
            {"method": "lora", "quantization": "nf4", "distributed": "fsdp", "num_gpus": 2},
            "cannot be sharded by FSDP2 or ZeRO-3",
        ),
        (
            {"optimizer": "adamw_8bit", "distributed": "deepspeed_zero3", "num_gpus": 2},
            "bitsandbytes' optimizers",
        ),
        ({"loss": "chunked", "distributed": "ddp", "num_gpus": 2}, "past the wrapper's forward"),
        ({"offload": "optimizer", "distributed": "ddp", "num_gpus": 2}, "needs fsdp or deepspeed"),
        ({"offload": "optimizer", "distributed": "fsdp", "num_gpus": 2}, "offloads parameters"),
        (
            {"offload": "optimizer_and_params", "distributed": "deepspeed_zero2", "num_gpus": 2},
            "needs deepspeed_zero3",
        ),
        ({"offload": "disk", "distributed": "fsdp", "num_gpus": 2}, "offload 'disk' is not one of"),
    ],
)
def test_combinations_that_cannot_run_are_refused_with_reasons(fields, problem):
    with pytest.raises(UsageError, match=problem):
        Recipe.from_dict({"method": "full", **fields})


def test_the_effective_batch_stays_fixed_over_gpus():
    space = distributed_space(SearchSpace.load().restricted({"distributed": ("fsdp",)}), (2,), {})
    assert 8 not in space.choices_of("micro_batch_size")  # 8 x 2 GPUs > the batch of 8
    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-0.5b.json"))
    for micro in space.choices_of("micro_batch_size"):
        params = space.params_like({"method": "full", "micro_batch_size": micro})
        recipe = space.build(params, "m", spec, 256)
        assert recipe.num_gpus == 2 and recipe.distributed == "fsdp"
        assert recipe.effective_batch_size == space.effective_batch_size


def test_the_space_on_two_gpus_leaves_out_what_cannot_run(monkeypatch):
    unsupported: dict[str, dict[str, str]] = {}
    demo = SearchSpace.load(DEMO_SPACE)
    space = distributed_space(demo, (2,), unsupported)
    zero = ("deepspeed_zero2", "deepspeed_zero3") if distributed.deepspeed_installed() else ()
    assert space.choices_of("distributed") == ("ddp", "fsdp", *zero)
    assert space.choices_of("num_gpus") == (2,)
    assert space.choices_of("quantization") == ("none",)
    assert space.choices_of("optimizer") == ("adamw",)
    assert space.choices_of("micro_batch_size") == (1, 2)  # 4 x 2 GPUs > the batch of 4
    assert "FSDP2" in unsupported["quantization"]["nf4"]
    assert "does not divide" in unsupported["micro_batch_size"]["4"]
    with_zero = SearchSpace.from_dict(
        {
            **yaml.safe_load(DEMO_SPACE.read_text()),
            "distributed": ["ddp", "deepspeed_zero2"],
            "precision": ["bf16", "amp_fp16"],
        }
    )
    unsupported = {}
    kept = distributed_space(with_zero, (2,), unsupported)
    assert kept.choices_of("distributed") == ("ddp", "deepspeed_zero2")
    assert "DeepSpeed scales fp16 losses" in unsupported["precision"]["amp_fp16"]
    on_cpu = with_zero.restricted({"precision": ("bf16", "fp16")})
    unsupported = {}
    assert distributed_space(on_cpu, (2,), unsupported, "cpu").choices_of("precision") == ("bf16",)
    assert "CPU accelerator has no fp16" in unsupported["precision"]["fp16"]
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    unsupported = {}
    assert distributed_space(with_zero, (2,), unsupported).choices_of("distributed") == ("ddp",)
    assert "autotune[deepspeed]" in unsupported["distributed"]["deepspeed_zero2"]


def qwen2_7b_peak(**fields) -> int:
    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    recipe = Recipe.from_dict({**FULL, "optimizer": "adamw", **fields})
    return estimate(spec, recipe).peak_bytes


def test_the_replay_of_fsdp_on_four_gpus_holds_under_45_percent_of_one_gpu():
    """`autotune estimate`'s default memory model: FSDP2 itself, replayed for one rank."""
    from autotune.prediction import predict
    from autotune.replay import load_config

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    config = load_config(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    single = Recipe.from_dict({**FULL, "gradient_accumulation_steps": 8})
    sharded = single.replace(gradient_accumulation_steps=2, distributed="fsdp", num_gpus=4)
    one, used_one, _ = predict(spec, single, config)
    per_gpu, used, _ = predict(spec, sharded, config)
    assert used == used_one == "replay"
    assert per_gpu.peak_bytes <= 0.45 * one.peak_bytes


def test_fsdp_on_four_gpus_holds_under_45_percent_of_one_gpu_per_gpu():
    single = qwen2_7b_peak(gradient_accumulation_steps=8)
    fsdp4 = qwen2_7b_peak(gradient_accumulation_steps=2, distributed="fsdp", num_gpus=4)
    fsdp2 = qwen2_7b_peak(gradient_accumulation_steps=4, distributed="fsdp", num_gpus=2)
    ddp4 = qwen2_7b_peak(gradient_accumulation_steps=2, distributed="ddp", num_gpus=4)
    assert fsdp4 <= 0.45 * single
    assert fsdp4 < fsdp2 < single < ddp4  # DDP adds its gradient buckets to a full replica


def test_ddp_fsdp_and_zero_probes_run_real_gloo_groups(tiny_model, qa_data, tmp_path, monkeypatch):
    """Two ranks each, through gloo: each strategy trains the effective batch a single process
    would; DeepSpeed's ZeRO-2 and ZeRO-3 as DDP does, to the loss, compiling nothing. The 5
    eval rows are shared 3 and 2 by DDP's and ZeRO-2's ranks, and every rank reports the mean
    of all."""
    import dataclasses

    extensions = tmp_path / "torch_extensions"  # where DeepSpeed's JIT builds would go
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    runner = SubprocessProbeRunner(timeout_seconds=300, warm=False)
    fields = {"method": "full", "precision": "fp32", "micro_batch_size": 1}
    single = runner.run(
        dataclasses.replace(
            request_for(tiny_model, qa_data, steps=2, gradient_accumulation_steps=4, **fields),
            eval_rows=5,
        ),
        tmp_path / "single",
    )
    assert single.status == "ok", single.reason
    results = {}
    zero = ("deepspeed_zero2", "deepspeed_zero3") if distributed.deepspeed_installed() else ()
    for strategy in ("ddp", "fsdp", *zero):
        workdir = tmp_path / strategy
        request = request_for(
            tiny_model,
            qa_data,
            steps=2,
            gradient_accumulation_steps=2,
            distributed=strategy,
            num_gpus=2,
            **fields,
        )
        result = runner.run(dataclasses.replace(request, eval_rows=5), workdir)
        assert result.status == "ok", result.reason
        assert result.trained_tokens == single.trained_tokens  # tokens of all ranks
        assert result.peak_memory_bytes > 0 and result.tokens_per_second > 0
        assert abs(result.eval_loss - single.eval_loss) < 0.05
        assert "step 2/2" in (workdir / "probe.rank1.log").read_text()
        rank1 = ProbeResult.from_json((workdir / "result.rank1.json").read_text())
        assert 0 < rank1.peak_memory_bytes <= result.peak_memory_bytes  # the peak over ranks
        assert rank1.eval_loss == pytest.approx(result.eval_loss, rel=1e-12)
        results[strategy] = result
    assert not extensions.exists()
    for strategy in zero:  # ZeRO's partitioned update is DDP's update: the same losses
        assert results[strategy].train_loss == pytest.approx(results["ddp"].train_loss, abs=1e-4)
        assert results[strategy].eval_loss == pytest.approx(results["ddp"].eval_loss, abs=1e-4)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _ddp_probe_past_its_first_step(
    tiny_model,
    qa_data,
    workdir,
    monkeypatch,
    steps: int,
    timeout_seconds: float,
    first_step_seconds: float,
):
    """A two-rank DDP probe running in a thread, once rank 1 has logged its first step: the
    thread, where its result will be put, and the ranks' processes."""
    launched = []
    original = probe_module.launch_ranks

    def recording(*args, **kwargs):
        launched.append(original(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(probe_module, "launch_ranks", recording)
    request = request_for(
        tiny_model,
        qa_data,
        steps=steps,
        method="full",
        precision="fp32",
        micro_batch_size=1,
        gradient_accumulation_steps=2,
        distributed="ddp",
        num_gpus=2,
    )
    runner = SubprocessProbeRunner(timeout_seconds=timeout_seconds, warm=False)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(request, workdir)))
    thread.start()
    log = workdir / "probe.rank1.log"
    deadline = time.monotonic() + first_step_seconds
    while not (log.exists() and "step 1/" in log.read_text()):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.2)
    return thread, outcome, launched[0].processes


def test_a_killed_rank_fails_the_probe_and_leaves_no_process(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    thread, outcome, ranks = _ddp_probe_past_its_first_step(
        tiny_model,
        qa_data,
        tmp_path / "p",
        monkeypatch,
        steps=200,
        timeout_seconds=300,
        first_step_seconds=240,
    )
    os.kill(ranks[1].pid, 9)
    thread.join(60)
    assert not thread.is_alive()
    result = outcome[0]
    assert result.status == "crash"
    assert "rank 1 of 2 was killed by signal 9" in result.reason
    assert not any(_alive(p.pid) for p in ranks)


def test_a_hung_rank_fails_the_probe_at_its_timeout_and_leaves_no_process(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    """Rank 1 stopped (SIGSTOP) after its first step stands for a rank that hangs: rank 0
    waits in its gradient all-reduce, and the probe's timeout ends both."""
    import signal

    thread, outcome, ranks = _ddp_probe_past_its_first_step(
        tiny_model,
        qa_data,
        tmp_path / "p",
        monkeypatch,
        steps=100_000,
        timeout_seconds=90,
        first_step_seconds=85,
    )
    os.kill(ranks[1].pid, signal.SIGSTOP)
    thread.join(120)
    assert not thread.is_alive()
    result = outcome[0]
    assert result.status == "timeout" and "no result within 90 s" in result.reason
    assert not any(_alive(p.pid) for p in ranks)


def full_fine_tunes_on_ranks(tmp_path, strategies):
    """A space of cheap full fp32 fine-tunes on the given strategies, written to tmp_path."""
    space = yaml.safe_load(DEMO_SPACE.read_text())
    space.update(
        method=["full"],
        quantization=["none"],
        precision=["fp32"],
        micro_batch_size=[1],
        gradient_checkpointing=[False],
        optimizer=["adamw"],
        distributed=list(strategies),
    )
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    return space_path


def full_fp32_cpu_study(tiny_model, qa_data, tmp_path, strategies, gpus_per_probe, name):
    """Settings of a two-trial CPU study of those fine-tunes on `gpus_per_probe` gloo ranks."""
    from autotune.study import RunSettings

    space_path = full_fine_tunes_on_ranks(tmp_path, strategies)
    return RunSettings(
        model=str(tiny_model),
        data_path=qa_data,
        budget_bytes=10**10,
        space_path=space_path,
        trials=2,
        probe_steps=2,
        seq_len=48,
        device="cpu",
        confirm_top=0,
        gpus_per_probe=gpus_per_probe,
        memory_model="formula",
        storage=f"sqlite:///{tmp_path}/study.db",
        study_name=name,
    )


@pytest.mark.parametrize(
    "strategies",
    [
        ("ddp", "fsdp"),
        pytest.param(
            ("deepspeed_zero2", "deepspeed_zero3"),
            marks=pytest.mark.skipif(
                not distributed.deepspeed_installed(), reason="deepspeed is not installed"
            ),
        ),
    ],
)
def test_a_cpu_study_with_two_gpus_per_probe_probes_each_strategy(
    tiny_model, qa_data, tmp_path, monkeypatch, strategies
):
    from autotune.study import prepare_run, run_study, trial_record
    from autotune.study.records import trial_status

    monkeypatch.chdir(tmp_path)
    settings = full_fp32_cpu_study(tiny_model, qa_data, tmp_path, strategies, 2, "two-ranks")
    prepared = prepare_run(settings)
    study = run_study(prepared, SubprocessProbeRunner(timeout_seconds=300, warm=False))
    trials = {t.params["distributed"]: t for t in study.trials}
    assert set(trials) == set(strategies)
    for strategy, trial in trials.items():
        assert str(trial_status(trial)) == "measured", trial.user_attrs.get("reason")
        assert trial_record(trial).recipe["distributed"] == strategy
        assert trial_record(trial).recipe["num_gpus"] == 2


def _documented_fsdp_config_keys() -> set[str]:
    """The fsdp_config keys TrainingArguments' docstring lists under "Supported keys"."""
    import re

    from transformers import TrainingArguments

    doc = TrainingArguments.__doc__
    section = doc[doc.index("fsdp_config (") : doc.index("deepspeed (")]
    return set(re.findall(r"^\s+- (\w+) \(", section, re.MULTILINE))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_exports_carry_the_strategy_under_the_tools_names(strategy):
    from autotune.formats import axolotl_config, hf_config, llamafactory_config, render

    recipe = Recipe.from_dict({**FULL, "distributed": strategy, "num_gpus": 2})
    training = hf_config(recipe)["training_arguments"]
    axolotl = axolotl_config(recipe)
    llamafactory = llamafactory_config(recipe)
    stage = strategy.removeprefix("deepspeed_zero")
    if strategy == "ddp":
        assert training["ddp_bucket_cap_mb"] == 25
    elif strategy == "fsdp":
        assert training["fsdp"] is True and training["fsdp_config"]["version"] == 2
        assert set(training["fsdp_config"]) <= _documented_fsdp_config_keys()
        from transformers import TrainingArguments

        built = TrainingArguments(
            **{**training, "output_dir": "out", "use_cpu": True, "bf16": False}
        )
        assert built.fsdp and built.fsdp_config["reshard_after_forward"] is True
        # axolotl's FSDPConfig schema (src/axolotl/utils/schemas/fsdp.py)
        assert axolotl["fsdp_version"] == 2
        assert set(axolotl["fsdp_config"]) <= {
            "activation_checkpointing",
            "offload_params",
            "cpu_ram_efficient_loading",
            "state_dict_type",
            "auto_wrap_policy",
            "transformer_layer_cls_to_wrap",
            "reshard_after_forward",
        }
        assert "fsdp2_config.yaml" in render("llamafactory", recipe, None)
    else:
        assert training["deepspeed"]["zero_optimization"]["stage"] == int(stage)
        # the JSON files axolotl and LLaMA-Factory ship
        assert axolotl["deepspeed"] == f"deepspeed_configs/zero{stage}.json"
        assert llamafactory["deepspeed"] == f"examples/deepspeed/ds_z{stage}_config.json"
    for fmt in ("hf", "axolotl", "llamafactory"):
        assert "# on 2 GPUs: " in render(fmt, recipe, None)
    assert Recipe.from_yaml(render("autotune", recipe, None)) == recipe


RANK_TRACE = """
import json, sys
from autotune.recipe import Recipe
from autotune.step_trace import trace_step
from autotune.training.ranks import end_rank, join_process_group
recipe = Recipe.from_yaml(sys.stdin.read())
print(json.dumps(trace_step(recipe, place=join_process_group(recipe, "cpu")).peak_bytes))
end_rank()
"""


def traced_peaks_of_two_ranks(script: str, recipe, tmp_path, *args: str):
    """Two gloo ranks running `script` (the recipe on its stdin; it prints its traced peak
    last): their peaks, and their exit codes (None: killed after 120 s)."""
    from autotune.probe_ranks import RENDEZVOUS_ENV

    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"rank{rank}.log").open("w"),
            text=True,
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                RENDEZVOUS_ENV: str(tmp_path / "rendezvous"),
            },
        )
        for rank in range(2)
    ]
    for rank in ranks:
        rank.stdin.write(recipe.to_yaml())
        rank.stdin.close()
    printed = [rank.stdout.read().strip().splitlines() for rank in ranks]
    exit_codes: list[int | None] = []
    for rank in ranks:
        try:
            exit_codes.append(rank.wait(120))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait()
            exit_codes.append(None)
    for number, lines in enumerate(printed):
        assert lines, (tmp_path / f"rank{number}.log").read_text()[-3000:]
    return [json.loads(lines[-1]) for lines in printed], exit_codes


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "full", "gradient_checkpointing": True},
        {"method": "lora", "lora_r": 8, "lora_dropout": 0.0, "gradient_checkpointing": False},
    ],
)
def test_the_fsdp_replay_allocates_what_a_real_gloo_rank_allocates(cut_model, tmp_path, fields):
    """Two real ranks run FSDP2 over gloo, every storage of their second step traced; the
    replay runs the same FSDP2 code for rank 0 on the meta device over a fake process group."""

    from autotune.replay import load_config, replay

    recipe = Recipe.from_dict(
        {
            "model": str(cut_model),
            "attention": "eager",
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "seq_len": 128,
            "distributed": "fsdp",
            "num_gpus": 2,
            **fields,
        }
    )
    traced, exit_codes = traced_peaks_of_two_ranks(RANK_TRACE, recipe, tmp_path)
    assert exit_codes == [0, 0]
    replayed = replay(recipe, load_config(str(cut_model)), cublas_workspace_bytes=0)
    for peak in traced:
        assert abs(replayed.peak_allocated_bytes - peak) <= 0.01 * peak
    single = replay(
        recipe.replace(distributed="none", num_gpus=1, gradient_accumulation_steps=2),
        load_config(str(cut_model)),
        cublas_workspace_bytes=0,
    )
    assert replayed.at_peak["weights"] < 0.6 * single.at_peak["weights"]  # half of them each


def test_gpus_are_cut_into_groups_of_gpus_per_probe(tmp_path):
    from autotune.study.settings import RunSettings, check_workers, gpu_groups

    def settings(**changes):
        return RunSettings(model="m", data_path=tmp_path, budget_bytes=1, **changes)

    four = settings(gpus=("0", "1", "2", "3"), gpus_per_probe=2)
    assert gpu_groups(four, "cuda") == ["0,1", "2,3"]
    assert gpu_groups(settings(gpus_per_probe=3), "cuda") == ["0,1,2"]
    assert gpu_groups(settings(gpus_per_probe=2), "cpu") == []
    assert gpu_groups(settings(gpus=("0", "1")), "cuda") == ["0", "1"]
    with pytest.raises(UsageError, match="divide the 3 GPUs"):
        check_workers(settings(gpus=("0", "1", "2"), gpus_per_probe=2), "cpu")


def test_gloo_ranks_on_the_cpu_are_capped_by_its_cores(monkeypatch, tiny_model):
    # N gloo processes on fewer cores take turns: they time the machine, not the recipe
    from autotune.study.settings import RunSettings, check_workers
    from autotune.training.ranked_train import check_ranked

    monkeypatch.setattr(distributed, "usable_cpu_cores", lambda: 2)
    settings = RunSettings(model="m", data_path=tiny_model, budget_bytes=1, gpus_per_probe=(1, 2))
    check_workers(settings, "cpu")
    check_ranked(Recipe.from_dict({**FULL, "distributed": "ddp", "num_gpus": 2}), "cpu", ())
    refusal = "3 gloo processes would stand in for 3 GPUs on the CPU, more than the 2 CPU cores"
    with pytest.raises(UsageError, match=f"--gpus-per-probe 3 on --device cpu: {refusal}"):
        check_workers(dataclasses.replace(settings, gpus_per_probe=(1, 2, 3)), "cpu")
    with pytest.raises(UsageError, match=f"cannot run this recipe: {refusal}"):
        check_ranked(Recipe.from_dict({**FULL, "distributed": "ddp", "num_gpus": 3}), "cpu", ())


def test_gloo_ranks_of_every_worker_on_the_cpu_are_capped_by_its_cores(monkeypatch, tmp_path):
    # two workers' probes of 2 gloo processes each run 4 at once: on 2 cores they take turns
    from autotune.study.settings import RunSettings, check_workers

    monkeypatch.setattr(distributed, "usable_cpu_cores", lambda: 2)
    settings = RunSettings(
        model="m", data_path=tmp_path, budget_bytes=1, gpus_per_probe=(1, 2), workers=2
    )
    refusal = "4 gloo processes would stand in for 4 GPUs on the CPU, more than the 2 CPU cores"
    with pytest.raises(
        UsageError, match=f"--workers 2 x --gpus-per-probe 2 on --device cpu: {refusal}"
    ):
        check_workers(settings, "cpu")
    # probes of one process each: as many at once as the cores, no more (they would share
    # the cores, and each measure the shared machine's tokens/s)
    one_process = dataclasses.replace(settings, gpus_per_probe=(1,))
    check_workers(one_process, "cpu")
    with pytest.raises(
        UsageError,
        match="^--workers 3 on --device cpu: 3 probes would train at once on the CPU, more than "
        "the 2 CPU cores this process may use$",
    ):
        check_workers(dataclasses.replace(one_process, workers=3), "cpu")
    monkeypatch.setattr(distributed, "usable_cpu_cores", lambda: 4)
    check_workers(settings, "cpu")
    check_workers(dataclasses.replace(one_process, workers=4), "cpu")


def test_cpu_probes_at_once_share_the_cores_and_a_study_keeps_its_share(
    workspace,  # noqa: F811
    monkeypatch,
):
    """Two workers' probes each took every core (torch's own thread count), so each timed the
    other's training as well as its own recipe."""
    from autotune.study import prepare_run, run_study

    monkeypatch.setattr(distributed, "usable_cpu_cores", lambda: 4)
    shared = FakeRunner()
    run_study(prepare_run(settings_for(workspace, trials=2, workers=2)), shared)
    assert shared.requests and {r.cpu_threads for r in shared.requests} == {2}  # confirmed too
    alone = FakeRunner()
    run_study(prepare_run(settings_for(workspace, trials=1, study_name="alone")), alone)
    assert {r.cpu_threads for r in alone.requests} == {None}  # every core
    assert distributed.cpu_threads_per_process("cpu", 1, 2) == 2  # a probe's 2 gloo ranks
    assert distributed.cpu_threads_per_process("cuda", 2, 1) is None
    # tokens/s measured on 2 threads are not one worker's on 4: the study is not resumed so
    with pytest.raises(
        UsageError,
        match=r"the threads of each CPU probe \(the cores shared among --workers\) was 2, now "
        "every core",
    ):
        run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner())


@pytest.mark.parametrize("strategy", ["none", "ddp", "fsdp", "deepspeed_zero3"])
def test_the_accelerate_export_is_a_config_accelerate_reads(strategy, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from autotune.formats import render

    gpus = 1 if strategy == "none" else 4
    recipe = Recipe.from_dict({**FULL, "distributed": strategy, "num_gpus": gpus})
    path = tmp_path / "accelerate.yaml"
    path.write_text(render("accelerate", recipe, {"tokens_per_second": 1.0}))
    config = ClusterConfig.from_yaml_file(str(path))  # refuses keys it does not know
    # bf16 weights train without autocast, as probed; DeepSpeed's bf16 mode is the probe's
    mixed = "bf16" if strategy.startswith("deepspeed") else "no"
    assert config.num_processes == gpus and config.mixed_precision == mixed
    expected = {"none": "NO", "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    assert config.distributed_type == DistributedType(expected[strategy])
    if strategy == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if strategy == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3


def test_a_study_resumed_on_other_gpus_per_probe_is_refused(workspace):  # noqa: F811
    from autotune.study import prepare_run, run_study

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    with pytest.raises(UsageError, match="--gpus-per-probe was 1, now 2"):
        run_study(prepare_run(settings_for(workspace, trials=2, gpus_per_probe=2)), FakeRunner())


def test_offload_moves_the_shards_to_host_memory_in_the_prediction_and_the_exports():
    from autotune.formats import accelerate_config, axolotl_config, hf_config, llamafactory_config

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    sharded = Recipe.from_dict(
        {**FULL, "gradient_accumulation_steps": 2, "distributed": "fsdp", "num_gpus": 4}
    )
    offloaded = sharded.replace(offload="optimizer_and_params")
    assert "offload" not in sharded.to_dict() and Recipe.from_yaml(offloaded.to_yaml()) == offloaded
    on_gpu, with_offload = estimate(spec, sharded), estimate(spec, offloaded)
    moved = sum(on_gpu.breakdown[k] for k in ("weights", "gradients", "optimizer_states"))
    assert with_offload.host_bytes == moved + on_gpu.breakdown.get("optimizer_step_temporaries", 0)
    assert with_offload.peak_bytes < on_gpu.peak_bytes - moved + 2**30
    assert "weights" not in with_offload.breakdown and on_gpu.host_bytes == 0
    assert hf_config(offloaded)["training_arguments"]["fsdp_config"]["cpu_offload"] is True
    assert "cpu_offload" in _documented_fsdp_config_keys()
    assert axolotl_config(offloaded)["fsdp_config"]["offload_params"] is True
    assert accelerate_config(offloaded)["fsdp_config"]["fsdp_offload_params"] is True
    zero3 = offloaded.replace(distributed="deepspeed_zero3")
    zero = hf_config(zero3)["training_arguments"]["deepspeed"]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert axolotl_config(zero3)["deepspeed"]["zero_optimization"] == zero  # a mapping
    # the offload JSON LLaMA-Factory ships
    assert llamafactory_config(zero3)["deepspeed"] == "examples/deepspeed/ds_z3_offload_config.json"
    # accelerate's DeepSpeedPlugin fields (accelerate config asks them from ZeRO-2 on)
    for recipe, devices in (
        (zero3, ("cpu", "cpu")),
        (zero3.replace(offload="optimizer"), ("cpu", "none")),
        (zero3.replace(offload="none", distributed="deepspeed_zero2"), ("none", "none")),
    ):
        deepspeed = accelerate_config(recipe)["deepspeed_config"]
        assert (deepspeed["offload_optimizer_device"], deepspeed["offload_param_device"]) == devices


def test_offload_is_left_out_on_the_cpu_with_its_reason():
    space = SearchSpace.from_dict(
        {**yaml.safe_load(DEMO_SPACE.read_text()), "offload": ["none", "optimizer_and_params"]}
    )
    unsupported: dict[str, dict[str, str]] = {}
    on_cpu = distributed_space(
        space.restricted({"distributed": ("fsdp",)}), (2,), unsupported, "cpu"
    )
    assert on_cpu.choices_of("offload") == ("none",)
    assert "no GPU here" in unsupported["offload"]["optimizer_and_params"]
    on_gpu = distributed_space(space.restricted({"distributed": ("fsdp",)}), (2,), {}, "cuda")
    assert on_gpu.choices_of("offload") == ("none", "optimizer_and_params")


def test_offloading_recipes_over_the_host_budget_are_not_probed(workspace):  # noqa: F811
    import dataclasses

    from autotune.host_memory import host_budget
    from autotune.study import prepare_run, run_study
    from autotune.study.records import trial_status

    settings = settings_for(workspace, trials=2, gpus_per_probe=2, host_budget_bytes=1000)
    prepared = prepare_run(settings)
    offloading = prepared.space.restricted(
        {"distributed": ("fsdp",), "offload": ("optimizer_and_params",)}
    )
    runner = FakeRunner()
    study = run_study(dataclasses.replace(prepared, space=offloading, fitting_choices={}), runner)
    assert not runner.requests
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2
    for trial in finished:
        assert str(trial_status(trial)) == "over_budget_predicted"
        assert re.search(
            r"predicted host memory .* \(2 ranks\) > host budget", trial.user_attrs["reason"]
        )
    default = host_budget(None)
    assert 0 < default < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.skipif(not distributed.deepspeed_installed(), reason="deepspeed is not installed")
@pytest.mark.parametrize("gpus", [2, 4, 8])
@pytest.mark.parametrize(
    "strategy, offload",
    [
        ("deepspeed_zero2", "none"),
        ("deepspeed_zero2", "optimizer"),
        ("deepspeed_zero3", "none"),
        ("deepspeed_zero3", "optimizer"),
        ("deepspeed_zero3", "optimizer_and_params"),
    ],
)
def test_zero_model_states_are_deepspeeds_own_estimates(strategy, offload, gpus, monkeypatch):
    """The written-out terms give DeepSpeed's estimators' per-GPU figure to the byte; its host
    figure adds its additional_buffer_factor of 1.5 (and at least 16 or 18 bytes a parameter
    for the node, where 4 a GPU are more)."""
    from autotune import zero_memory

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    recipe = Recipe.from_dict(
        {**FULL, "distributed": strategy, "num_gpus": gpus, "offload": offload}
    )
    params = spec.total_params
    theirs = zero_memory.deepspeed_estimate(spec, recipe)
    ours = zero_memory.written_out(spec, recipe, 0, params, 8 * params)
    assert theirs is not None and theirs.source == "deepspeed"
    assert ours.gpu_bytes == theirs.gpu_bytes
    if offload == "none":
        assert ours.host_bytes == theirs.host_bytes == 0
    elif 4 * gpus <= 16:
        assert theirs.host_bytes == pytest.approx(1.5 * ours.host_bytes, rel=1e-6)
    with_deepspeed = estimate(spec, recipe)
    assert with_deepspeed.breakdown["zero_model_states_deepspeed"] == theirs.gpu_bytes
    monkeypatch.setattr(zero_memory, "deepspeed_installed", lambda: False)
    without = estimate(spec, recipe)
    assert without.breakdown["zero_model_states_formula"] == ours.gpu_bytes
    assert without.peak_bytes == with_deepspeed.peak_bytes


def test_zero_in_16_bits_holds_fp32_master_weights_beside_the_model():
    """DeepSpeed's bf16 mode keeps fp32 master weights and moments: more per GPU than FSDP's
    pure bf16 on as many GPUs, ZeRO-3 less than ZeRO-2, and fp32 runs the generic terms."""
    sharded = {"gradient_accumulation_steps": 2, "num_gpus": 4}
    fsdp = qwen2_7b_peak(distributed="fsdp", **sharded)
    zero2 = qwen2_7b_peak(distributed="deepspeed_zero2", **sharded)
    zero3 = qwen2_7b_peak(distributed="deepspeed_zero3", **sharded)
    assert fsdp < zero3 < zero2 < qwen2_7b_peak(gradient_accumulation_steps=8)
    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    fp32 = Recipe.from_dict(
        {**FULL, "precision": "fp32", "distributed": "deepspeed_zero3", **sharded}
    )
    assert not any(k.startswith("zero_model_states") for k in estimate(spec, fp32).breakdown)


@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_the_probes_deepspeed_config_is_the_exported_one_with_its_autos_filled(offload):
    from autotune.training.deepspeed_engine import probe_config

    recipe = Recipe.from_dict(
        {**FULL, "gradient_accumulation_steps": 3, "offload": offload}
        | {"distributed": "deepspeed_zero2", "num_gpus": 2, "micro_batch_size": 2}
    )
    exported, probed = distributed.deepspeed_config(recipe), probe_config(recipe)
    assert exported["zero_optimization"] == probed["zero_optimization"]
    assert set(exported) <= set(probed)
    assert "auto" not in str(probed)
    assert probed["train_batch_size"] == 2 * 3 * 2 and probed["bf16"] == {"enabled": True}


@pytest.mark.parametrize(
    "device, counts, where",
    [
        (
            "cpu",
            (2,),
            "on cpu (gloo processes stand in for each probe's 2 GPUs); budget 4.00 GiB "
            "per GPU; the formula's smallest recipe in the space needs 1.00 GiB per GPU with its "
            "margin (the replay's prediction on the data's rows, as its trial is held to the "
            "budget)",
        ),
        ("cpu", (1, 2), "on cpu (gloo processes stand in for each probe's 1,2 GPUs); budget"),
        ("cuda", (2,), "on cuda; budget 4.00 GiB per GPU;"),
        ("cpu", (1,), "on cpu; budget 4.00 GiB; the formula's smallest recipe in the space needs "),
    ],
)
def test_a_runs_headline_says_its_budget_is_per_gpu_and_what_stands_in_on_the_cpu(
    device, counts, where
):
    from types import SimpleNamespace

    from autotune.console import run_headline
    from autotune.study.settings import RunSettings

    settings = RunSettings(model="m", data_path="d", budget_bytes=4 * 2**30, gpus_per_probe=counts)
    prepared = SimpleNamespace(
        settings=settings, device=device, smallest_peak_bytes=2**30, smallest_peak_model="replay"
    )
    assert run_headline(prepared).startswith(where)


def test_gpus_with_an_empty_index_are_refused_and_a_missing_default_gpu_named(monkeypatch):
    import torch

    from autotune.distributed import parse_gpu_indices
    from autotune.options import TEXT_FORMS
    from autotune.training.ranked_train import check_ranked

    assert parse_gpu_indices(" 0, 1") == ("0", "1")
    for text in (",", "0,,1", "0,"):  # were read as fewer GPUs, or none
        with pytest.raises(UsageError, match=r"^--gpus takes GPU indices separated by commas"):
            TEXT_FORMS["gpus"].parse(text)
    assert parse_gpu_indices("01,2") == ("1", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    recipe = Recipe.from_dict({**FULL, "distributed": "ddp", "num_gpus": 2})
    with pytest.raises(UsageError) as refused:  # no --gpus given: not "--gpus 0,1: ..."
        check_ranked(recipe, "cuda", ())
    assert str(refused.value) == "the recipe trains on 2 GPUs, but this machine has 1"
    with pytest.raises(UsageError, match=r"^--gpus 0,0: this machine has GPUs 0-0, each named"):
        check_ranked(recipe, "cuda", ("0", "0"))


def test_a_malformed_gpus_is_refused_at_parse_naming_it(tmp_path, monkeypatch, capsys):
    """`--gpus a`, `-1`, `0,,1` or `0,0` were taken as GPU ids and refused later ("--gpus a
    needs CUDA, but the device is cpu"; run's --budget auto read GPU 'a' first), or not at all
    where the device was CUDA."""
    from autotune import cli

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    refusals = {
        "a": "--gpus takes GPU indices separated by commas (0,1), each a whole number from 0, "
        "got 'a'",
        "-1": "--gpus takes GPU indices separated by commas (0,1), each a whole number from 0, "
        "got '-1'",
        "0,x1": "--gpus takes GPU indices separated by commas (0,1), each a whole number from 0, "
        "got '0,x1'",
        "1,0,1": "--gpus names GPU 1 more than once, got '1,0,1'",
    }
    run = ["run", "-m", "m", "-d", str(data), "-b", "auto"]
    train = ["train", "-r", "r.yaml", "-d", str(data), "-o", str(tmp_path / "out")]
    for gpus, refusal in refusals.items():
        for args in (run, train):
            monkeypatch.setattr(
                sys, "argv", ["autotune", *args, "--device", "cpu", f"--gpus={gpus}"]
            )
            with pytest.raises(SystemExit) as exit_code:
                cli.main()
            assert exit_code.value.code == 2, args
            assert capsys.readouterr().err == f"autotune: error: {refusal}\n", args


def test_estimates_json_says_its_bytes_are_each_gpus(capsys):
    from autotune.api import memory_prediction
    from autotune.state_text import show_estimate

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    recipe = Recipe.from_dict({**FULL, "distributed": "fsdp", "num_gpus": 4})
    predicted = memory_prediction(spec, recipe, None, memory_model="formula")
    show_estimate(predicted, True, None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_gpus"] == 4 and printed["peak_bytes"] == estimate(spec, recipe).peak_bytes
    show_estimate(predicted, False, None)
    assert "predicted peak per GPU (x4)" in capsys.readouterr().out


def test_a_recipes_fit_to_the_budget_says_per_gpu_on_several():
    from autotune.margins import MemoryMargin, fit_words

    margin = MemoryMargin(0.1, "a tenth")
    one = fit_words(2**30, margin, 4 * 2**30, context_bytes=0)
    assert one.startswith("predicted 1.00 GiB, 1.10 GiB with a 10.0% margin") and "GPU" not in one
    assert fit_words(2**30, margin, 4 * 2**30, num_gpus=4, context_bytes=0) == (
        "predicted 1.00 GiB per GPU, 1.10 GiB with a 10.0% margin (a tenth): fits 4.00 GiB with "
        "2.90 GiB to spare per GPU"
    )


def test_what_a_study_leaves_out_for_its_gpus_is_not_blamed_on_the_model():
    from autotune.study.unmeasured import not_searched

    [line] = not_searched({"distributed": {"none": "one GPU, not 2"}}, {})
    assert line == "not searched, they cannot run here: distributed none (one GPU, not 2)"
