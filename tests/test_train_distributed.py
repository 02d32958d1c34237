"""`autotune train` of a recipe on several GPUs, with two gloo processes standing in for them:
DDP, FSDP2 and DeepSpeed ZeRO-3 train, rank 0 saves what transformers and peft load, resume
continues, ZeRO-2's eval loss is one process's, and a killed rank fails the run and leaves no
process."""

from __future__ import annotations

import os
import threading
import time

import pytest

import autotune.distributed as distributed
import autotune.probe_ranks as probe_ranks
from autotune.errors import TrainingFailed, UsageError
from autotune.recipe import Recipe
from autotune.training.train import train
from tests.test_multi_gpu import _alive


def two_rank_recipe(model, strategy: str, method: str) -> Recipe:
    lora = {"lora_r": 4, "lora_dropout": 0.0} if method == "lora" else {}
    return Recipe.from_dict(
        {
            "model": str(model),
            "method": method,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,  # x 2 ranks: an effective batch of 4
            "seq_len": 48,
            "learning_rate": 5e-3,
            "precision": "fp32",
            "distributed": strategy,
            "num_gpus": 2,
            **lora,
        }
    )


EVAL_ROWS = 5
"""Held-out rows of the two-rank runs: not a multiple of the ranks, so their shares differ."""


def eval_loss_of(model, recipe: Recipe, data) -> float:
    """The loss of `model` (one process, all rows) on the eval split a run of `recipe` on `data`
    holds out with EVAL_ROWS."""
    from autotune.data.rows import scan
    from autotune.data.splits import load_splits
    from autotune.training.build import load_tokenizer
    from autotune.training.loop import evaluate

    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(data, tokenizer, recipe.seq_len, 0, EVAL_ROWS, scan(data).usable_rows)
    assert len(splits.eval) % 2 == 1
    single = recipe.replace(distributed="none", num_gpus=1)
    return evaluate(model, splits.eval, single, "cpu", tokenizer.pad_token_id)


DEEPSPEED_INSTALLED = pytest.mark.skipif(
    not distributed.deepspeed_installed(), reason="deepspeed is not installed"
)


@pytest.mark.parametrize(
    "strategy, method",
    [
        ("ddp", "full"),
        ("fsdp", "lora"),
        pytest.param("deepspeed_zero3", "full", marks=DEEPSPEED_INSTALLED),
    ],
)
def test_two_ranks_train_and_rank_0_saves_what_the_libraries_load(
    tiny_model, qa_data, tmp_path, strategy, method
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = two_rank_recipe(tiny_model, strategy, method)
    out = tmp_path / "out"
    steps: list[int] = []
    report = train(
        recipe,
        qa_data,
        out,
        max_steps=4,
        eval_rows=EVAL_ROWS,
        eval_steps=2,
        save_every_steps=2,
        on_step=lambda step, loss: steps.append(step),
    )
    assert report.steps == 4 and steps == [1, 2, 3, 4]  # rank 0's progress, relayed
    assert [step for step, _ in report.evaluations] == [2, 4]
    assert (out / "ranks" / "train.rank1.log").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    starting = eval_loss_of(base, recipe, qa_data)
    if method == "lora":
        trained = PeftModel.from_pretrained(base, str(out))
    else:
        trained = AutoModelForCausalLM.from_pretrained(str(out))
    loaded = eval_loss_of(trained, recipe, qa_data)
    assert loaded < starting
    # the weights saved are the ones scored; DDP's ranks each scored their share of the rows
    # (3 and 2), and their loss sums and token counts make the mean of all
    tolerance = {"rel": 1e-5} if strategy == "ddp" else {"abs": 1e-3}
    assert report.eval_loss == pytest.approx(loaded, **tolerance)
    if strategy != "ddp":  # the sharded optimizer state comes back from the checkpoint
        resumed = train(recipe, qa_data, out, max_steps=5, resume=True, eval_rows=EVAL_ROWS)
        assert resumed.resumed_from_step == 4 and resumed.steps == 5
        assert resumed.losses[0] < report.losses[0]


@DEEPSPEED_INSTALLED
def test_a_zero_2_run_scores_its_eval_rows_as_one_process_does(tiny_model, qa_data, tmp_path):
    """ZeRO-2 shards the optimizer state and gradients, not the weights: each rank scores its
    share of the held-out rows (3 and 2) with the whole model, and the run's eval loss is the
    loss one process computes on all of them with the weights the run saved."""
    from transformers import AutoModelForCausalLM

    recipe = two_rank_recipe(tiny_model, "deepspeed_zero2", "full")
    out = tmp_path / "out"
    report = train(recipe, qa_data, out, max_steps=2, eval_rows=EVAL_ROWS)
    assert report.steps == 2 and report.eval_loss is not None
    single = eval_loss_of(AutoModelForCausalLM.from_pretrained(str(out)), recipe, qa_data)
    starting = eval_loss_of(AutoModelForCausalLM.from_pretrained(str(tiny_model)), recipe, qa_data)
    assert single < starting  # the weights saved are the trained ones
    assert report.eval_loss == pytest.approx(single, rel=1e-4)


def test_a_killed_rank_fails_the_training_in_one_line_and_leaves_no_process(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    launched = []
    original = probe_ranks.start_ranks

    def recording(*args, **kwargs):
        launched.append(original(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(probe_ranks, "start_ranks", recording)
    recipe = two_rank_recipe(tiny_model, "ddp", "lora")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            train(recipe, qa_data, tmp_path / "out", max_steps=100_000)
        except TrainingFailed as error:
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    progress = tmp_path / "out" / "ranks" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while not (progress.exists() and '"step"' in progress.read_text()):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.2)
    ranks = launched[0].processes
    os.kill(ranks[1].pid, 9)
    thread.join(60)
    assert not thread.is_alive()
    [failure] = failures
    assert str(failure).startswith("rank 1 of 2 was killed by signal 9 without a result")
    assert "\n" not in str(failure)
    assert not any(_alive(p.pid) for p in ranks)


def test_a_rank_that_left_no_result_is_named_before_the_peer_its_death_broke(tmp_path):
    """Both ranks ended between two looks: rank 0 wrote a failure (its peer's connection
    broke) and exited 0, rank 1 was killed. The killed one is the cause."""
    import subprocess
    import sys

    result_path = tmp_path / "result.json"
    write = f"open({str(result_path)!r}, 'w').write('{{\"status\": \"crash\"}}')"
    broken = subprocess.Popen([sys.executable, "-c", write])
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    for process in (broken, killed):
        process.wait()
    ranks = probe_ranks.RankProcesses([broken, killed], result_path)
    assert ranks.wait(10) and ranks.first_failed == 1
    assert ranks.failure_order() == [1, 0]
    # a kill comes from outside: the rank's log is named, not its last line quoted as a cause
    assert ranks.silent_reason(1, tmp_path / "probe.log") == (
        f"rank 1 of 2 was killed by signal 9 without a result (its log: {tmp_path}/probe.rank1.log)"
    )


def test_a_log_tail_quotes_the_error_not_a_library_warning_after_it(tmp_path):
    log = tmp_path / "probe.rank1.log"
    log.write_text(
        "Traceback (most recent call last):\n  ...\nValueError: no such row\n"
        "/venv/transformers/modeling_utils.py:3312: FutureWarning: `x` is deprecated\n"
        "  warnings.warn(\n\n",
        encoding="utf-8",
    )
    assert probe_ranks.log_tail(log) == "ValueError: no such row"


def _ended(*code: str):
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", ";".join(code)])
    process.wait()
    return process


def test_a_ranks_own_failure_is_named_before_the_peer_killed_after_it(tmp_path):
    """Rank 0 ran out of memory and wrote so; rank 1, waiting in a collective, was killed (or
    aborted) in the same look. The probe's result is rank 0's out of memory, not a crash."""
    import subprocess
    import sys

    from autotune.training.io import ProbeResult

    result_path = tmp_path / "result.json"
    oom = ProbeResult(status="oom", device="cpu", reason="out of memory").to_json()
    wrote = _ended(f"open({str(result_path)!r}, 'w').write({oom!r})")
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    waiting.kill()
    waiting.wait()
    ranks = probe_ranks.RankProcesses([wrote, waiting], result_path)
    assert ranks.wait(10) and ranks.first_failed == 0
    merged = probe_ranks.merged_result(ranks)
    assert merged.status == "oom" and merged.reason == "rank 0 of 2: out of memory"
    # a rank that wrote a failure is seen while it still runs (it may hang leaving its group)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        crash = ProbeResult(status="crash", device="cpu", reason="boom").to_json()
        ok_path = probe_ranks.rank_result_path(result_path, 1)
        ok_path.write_text(ProbeResult(status="ok", device="cpu").to_json())
        result_path.write_text(crash)
        assert probe_ranks.RankProcesses([running, _ended("pass")], result_path).failed_rank() == 0
    finally:
        running.kill()
        running.wait()


def test_deepspeed_recipes_without_deepspeed_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: False)
    recipe = Recipe.from_dict(
        {"model": "m", "method": "full", "distributed": "deepspeed_zero2", "num_gpus": 2}
    )
    with pytest.raises(UsageError, match="needs DeepSpeed installed .pip install 'autotune"):
        train(recipe, tmp_path / "data.jsonl", tmp_path / "out", max_steps=1)


@DEEPSPEED_INSTALLED
def test_fp16_zero_on_a_processor_without_fp16_is_refused_in_one_line(tmp_path, monkeypatch):
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(
        CPU_Accelerator, "supported_dtypes", lambda self: [torch.float, torch.bfloat16]
    )
    recipe = Recipe.from_dict(
        {
            "model": "m",
            "method": "full",
            "precision": "fp16",
            "distributed": "deepspeed_zero2",
            "num_gpus": 2,
        }
    )
    with pytest.raises(UsageError, match="no fp16 on this processor .* choose bf16 or fp32"):
        train(recipe, tmp_path / "data.jsonl", tmp_path / "out", max_steps=1)


def test_ranks_meet_under_a_relative_output_whose_name_is_no_url(tmp_path, monkeypatch):
    """`--output run#1` (relative, a `#` in it): the rendezvous file is found where the
    launcher put it, not read as a URL's host and fragment. One rank of one, in this
    process."""
    import torch.distributed as dist

    from autotune.training.ranks import RankPlace, join_process_group, leave_process_group

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run#1" / "ranks"
    folder.mkdir(parents=True)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(probe_ranks.RENDEZVOUS_ENV, "run#1/ranks/rendezvous")
    leave_process_group()  # the fake group an FSDP replay earlier in this process keeps
    try:
        place = join_process_group(two_rank_recipe("m", "ddp", "full"), "cpu")
        assert place == RankPlace(0, 1, "cpu") and dist.get_world_size() == 1
    finally:
        leave_process_group()


@pytest.mark.parametrize(
    "source, peak_line",
    [
        ("cuda_max_reserved", "peak memory per GPU (the largest of 2 ranks) 1.00 GiB"),
        ("cpu_peak_rss_delta", "peak memory per rank (the largest of 2) 1.00 GiB (CPU RSS"),
    ],
)
def test_a_two_rank_runs_figures_say_they_are_per_gpu_and_summed(tmp_path, source, peak_line):
    from pathlib import Path

    from rich.console import Console

    from autotune.api import TrainResult
    from autotune.train_console import show_trained
    from autotune.training.train_plan import TrainReport

    report = TrainReport(
        steps=4,
        resumed_from_step=0,
        tokens_per_second=2000.0,
        peak_memory_bytes=2**30,
        memory_source=source,
        eval_loss=1.0,
        train_loss=1.0,
        output_dir=Path("out"),
        budget_enforced=False,
    )
    console = Console(record=True, width=300)
    show_trained(console, TrainResult(report, None, {}, ranks=2))
    text = console.export_text()
    assert peak_line in text and "tokens/s (2 ranks together) 2,000" in text
    console = Console(record=True, width=300)
    show_trained(console, TrainResult(report, None, {}))
    assert "peak memory 1.00 GiB" in console.export_text() and "ranks" not in console.export_text()


def test_a_zero2_checkpoint_from_before_the_strategy_was_kept_is_refused_as_zero3(
    tiny_model, qa_data, tmp_path, monkeypatch, capsys
):
    """A checkpoint written before checkpoints kept their strategy holds ZeRO partitions but
    no stage: a ZeRO-2 one resumed as ZeRO-3 was accepted and read its partitions in the other
    layout. Its run's recipe file names the stage: `autotune train --resume` refuses it in one
    line (exit 2) before anything is built, and the stage that wrote it still resumes past the
    check."""
    import sys

    import torch

    import autotune.training.ranked_train
    from autotune import cli
    from autotune.training.checkpoints import check_resumable
    from autotune.training.train_plan import RUN_MARKER

    # the machine's checks of gloo ranks and DeepSpeed on the CPU are not what this is about
    monkeypatch.setattr(autotune.training.ranked_train, "check_ranked", lambda *args: None)
    output = tmp_path / "out"
    checkpoint = output / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    zero2 = two_rank_recipe(tiny_model, "deepspeed_zero2", "lora")
    torch.save({"step": 2, "extra": {"effective_batch_size": 4}}, checkpoint / "state.pt")
    for rank in (0, 1):
        torch.save({}, checkpoint / f"zero_rank{rank}.pt")
    (output / RUN_MARKER).write_text(zero2.to_yaml(), encoding="utf-8")
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text(zero2.replace(distributed="deepspeed_zero3").to_yaml(), encoding="utf-8")
    argv = ["autotune", "train", "--recipe", str(zero3), "--data", str(qa_data)]
    argv += ["--output", str(output), "--resume", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"autotune: error: --resume: {checkpoint} was written by deepspeed_zero2 and this recipe "
        "trains with deepspeed_zero3; ZeRO keeps its optimizer states in partitions of its own, "
        "so resume with the strategy that wrote it\n"
    )
    check_resumable(checkpoint, zero2)  # its own stage passes
    (output / RUN_MARKER).unlink()  # nothing names the stage: the partitions alone decide
    check_resumable(checkpoint, zero2.replace(distributed="deepspeed_zero3"))


def test_a_resume_across_deepspeeds_boundary_or_stages_is_refused_in_one_line(tmp_path):
    """A ZeRO-2 checkpoint resumed as ZeRO-3 had its fp32 partitions read in the other layout
    (eval loss 6.10 became 6.26 two steps on); DDP resumed from it crashed on an empty
    optimizer state."""
    from autotune.training.checkpoints import STRATEGY_KEY, check_same_strategy

    def refusal(written: str | None, strategy: str, partitions: bool = False) -> str | None:
        path = tmp_path / f"{written}-{strategy}-{partitions}"
        path.mkdir()
        if partitions:
            (path / "zero_rank0.pt").write_bytes(b"")
        extra = {STRATEGY_KEY: written} if written else {}
        try:
            check_same_strategy(extra, two_rank_recipe("m", strategy, "lora"), path)
        except UsageError as error:
            return str(error).removeprefix(f"--resume: {path} ")
        return None

    assert refusal("deepspeed_zero2", "deepspeed_zero3") == (
        "was written by deepspeed_zero2 and this recipe trains with deepspeed_zero3; ZeRO keeps "
        "its optimizer states in partitions of its own, so resume with the strategy that wrote it"
    )
    assert refusal("deepspeed_zero2", "ddp").startswith("was written by deepspeed_zero2 and")
    assert refusal("fsdp", "deepspeed_zero2").startswith("was written by fsdp and")
    # from before the strategy was kept: told by the partition files
    assert refusal(None, "deepspeed_zero2").startswith("was written by a run without DeepSpeed")
    assert refusal(None, "ddp", partitions=True).startswith("was written by a DeepSpeed ZeRO run")
    for written, strategy, partitions in (
        ("ddp", "fsdp", False),  # full state dicts both, resharded on load
        ("deepspeed_zero3", "deepspeed_zero3", True),
        (None, "deepspeed_zero3", True),
        (None, "fsdp", False),
    ):
        assert refusal(written, strategy, partitions) is None


def test_each_rank_receives_the_token_cache_the_parent_made(tmp_path):
    """The plan reaches the ranks as JSON: its token cache with it, so that no rank tokenizes
    the data again."""
    from pathlib import Path

    from autotune.training.ranked_train import _plan_json, _plan_of
    from autotune.training.train_plan import TrainPlan

    cache = tmp_path / "out" / ".autotune-tokens" / "tokens-0123"
    plan = TrainPlan(
        recipe=two_rank_recipe("m", "ddp", "full"),
        data_path=Path("data.jsonl"),
        output_dir=tmp_path / "out",
        device="cpu",
        token_cache=cache,
        gpus=("0", "1"),
        eval_rows=EVAL_ROWS,
    )
    received = _plan_of(_plan_json(plan))
    assert received == plan and received.token_cache == cache
