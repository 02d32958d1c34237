"""Real probes in child processes on a tiny random model (CPU), and their failure modes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from autotune.probe import SubprocessProbeRunner
from autotune.recipe import Recipe
from autotune.training.io import (
    CPU_MEMORY_SOURCE,
    CUDA_MEMORY_SOURCE,
    PROBE_PHASES,
    ProbeRequest,
)


def request_for(model, data, device="cpu", budget_bytes=10**10, steps=3, **recipe):
    base = {
        "model": str(model),
        "method": "lora",
        "lora_r": 4,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "seq_len": 64,
        "learning_rate": 1e-3,
    }
    fields = {**base, **recipe}
    if fields["method"] != "lora":
        fields = {k: v for k, v in fields.items() if not k.startswith("lora_")}
    return ProbeRequest(
        recipe=Recipe.from_dict(fields),
        data_path=str(data),
        steps=steps,
        device=device,
        budget_bytes=budget_bytes,
        seed=0,
    )


@pytest.mark.parametrize(
    "recipe",
    [
        {},
        {"quantization": "nf4", "optimizer": "adamw_8bit"},
        {"method": "freeze", "frozen_layers": 2, "gradient_checkpointing": False},
        {"batching": "padding_free"},
        {"batching": "packed"},
    ],
    ids=["lora-bf16", "qlora-8bit-adam", "freeze", "padding-free", "packed"],
)
def test_probe_measures_a_recipe(tiny_model, qa_data, tmp_path, recipe):
    result = SubprocessProbeRunner(timeout_seconds=300).run(
        request_for(tiny_model, qa_data, **recipe), tmp_path / "probe"
    )
    assert result.status == "ok", result.reason
    assert result.steps_done == 3
    assert result.tokens_per_second > 0 and result.trained_tokens > 0
    # A random model over a 512-token vocabulary starts near ln(512) = 6.24.
    assert 4.0 < result.eval_loss < 7.5 and math.isfinite(result.train_loss)
    assert result.memory_source == CPU_MEMORY_SOURCE and result.peak_memory_bytes > 0
    assert set(result.seconds) == {*PROBE_PHASES, "total"}
    assert len(result.step_seconds) == 3 and all(t > 0 for t in result.step_seconds)
    log = (tmp_path / "probe" / "probe.log").read_text()
    assert "step 3/3" in log


def test_a_cpu_probe_trains_with_the_threads_it_is_given(tiny_model, qa_data, tmp_path):
    """A probe forked from the warm server, which imported torch with every core's threads,
    trains with its share of the cores (--workers) and says so."""
    request = dataclasses.replace(request_for(tiny_model, qa_data, steps=1), cpu_threads=1)
    result = SubprocessProbeRunner(timeout_seconds=300).run(request, tmp_path / "probe")
    assert result.status == "ok", result.reason
    assert result.cpu_threads == 1


def test_probe_timeout_kills_the_child(tiny_model, qa_data, tmp_path):
    # a forked probe of the tiny model finishes 3 steps in about 0.3 s: ask for far more
    result = SubprocessProbeRunner(timeout_seconds=0.5).run(
        request_for(tiny_model, qa_data, steps=100_000), tmp_path / "probe"
    )
    assert result.status == "timeout"
    assert "within 0.5 s" in result.reason


def test_probe_crash_is_classified(tmp_path, qa_data):
    missing = tmp_path / "no-model"
    missing.mkdir()
    result = SubprocessProbeRunner(timeout_seconds=120).run(
        request_for(missing, qa_data), tmp_path / "probe"
    )
    assert result.status == "crash"
    assert result.reason and "\n" not in result.reason


def test_diverging_recipe_is_reported_as_nan(tiny_model, qa_data, tmp_path):
    result = SubprocessProbeRunner(timeout_seconds=300).run(
        request_for(
            tiny_model, qa_data, steps=4, precision="fp32", learning_rate=1e30, lora_alpha=10**6
        ),
        tmp_path / "probe",
    )
    assert result.status == "nan", result.reason
    assert result.steps_done >= 1


@pytest.mark.gpu
def test_budget_is_enforced_on_cuda(tiny_model, qa_data, tmp_path):
    # 600 MB leaves the allocator a few dozen MB beyond the CUDA context; long sequences and a
    # big micro-batch of full fine-tuning in fp32 need more.
    result = SubprocessProbeRunner(timeout_seconds=300).run(
        request_for(
            tiny_model,
            qa_data,
            device="cuda",
            budget_bytes=600 * 10**6,
            method="full",
            precision="fp32",
            micro_batch_size=8,
            gradient_accumulation_steps=1,
            seq_len=512,
        ),
        tmp_path / "probe",
    )
    assert result.budget_enforced
    assert result.memory_source == CUDA_MEMORY_SOURCE
    assert result.status in ("oom", "ok")
    if result.status == "ok":
        assert result.peak_memory_bytes <= 600 * 10**6


def test_warm_probes_are_forked_and_isolated(tiny_model, qa_data, tmp_path):
    runner = SubprocessProbeRunner(timeout_seconds=300, warm=True)
    try:
        crashed = runner.run(request_for(tmp_path / "no-such-model", qa_data), tmp_path / "crash")
        assert crashed.status == "crash" and crashed.forked
        server_pid = runner.server.process.pid
        first = runner.run(request_for(tiny_model, qa_data), tmp_path / "first")
        second = runner.run(request_for(tiny_model, qa_data), tmp_path / "second")
        # The crash did not take the server down, and did not change what the next probes see.
        assert runner.server.process.pid == server_pid
        for result in (first, second):
            assert result.status == "ok", result.reason
            assert result.forked
        assert first.eval_loss == pytest.approx(second.eval_loss, rel=1e-6)
        # Each probe is its own process: the exit status file of each names a finished child.
        assert (tmp_path / "second" / "exit_code").read_text() == "0"
        # Imports happened once in the server, so a forked probe starts in well under a second.
        assert second.seconds["start"] < 1.0
    finally:
        runner.close()
    assert runner.server.process is None


def test_warm_probe_timeout_kills_the_probe_not_the_server(tiny_model, qa_data, tmp_path):
    import os

    runner = SubprocessProbeRunner(timeout_seconds=0.5, warm=True)
    try:
        result = runner.run(request_for(tiny_model, qa_data, steps=50), tmp_path / "slow")
        assert result.status == "timeout"
        assert runner.server.alive()
        exit_code = int((tmp_path / "slow" / "exit_code").read_text())
        assert exit_code == -9  # SIGKILL of the probe's process group
    finally:
        runner.close()
    assert not os.path.exists(tmp_path / "slow" / "result.json")


def test_probes_start_cold_when_the_server_cannot_serve(tiny_model, qa_data, tmp_path, monkeypatch):
    from autotune.probe import ProbeServer

    def refuse(self):
        self.unavailable = "CUDA was initialised while importing the libraries"
        return False

    monkeypatch.setattr(ProbeServer, "_start", refuse)
    runner = SubprocessProbeRunner(timeout_seconds=300, warm=True)
    result = runner.run(request_for(tiny_model, qa_data), tmp_path / "cold")
    assert result.status == "ok", result.reason
    assert not result.forked


def test_qlora_probes_read_the_base_from_an_nf4_copy(tiny_model, qa_data, tmp_path):
    cache = tmp_path / "cache"
    runner = SubprocessProbeRunner(timeout_seconds=300)
    qlora = request_for(tiny_model, qa_data, quantization="nf4")
    qlora = dataclasses.replace(qlora, weight_cache=str(cache))
    first = runner.run(qlora, tmp_path / "first")
    second = runner.run(qlora, tmp_path / "second")
    runner.close()
    assert first.status == second.status == "ok", (first.reason, second.reason)
    assert first.weights == "original, nf4 cache written"
    assert second.weights == "nf4 cache"
    [copy] = [p for p in cache.iterdir() if p.name.startswith("weights-nf4-")]
    assert (copy / "config.json").exists() and any(copy.glob("*.safetensors"))
    # the same quantized weights, the same batches: the same training
    assert second.train_loss == pytest.approx(first.train_loss, abs=1e-6)
    assert second.eval_loss == pytest.approx(first.eval_loss, abs=1e-6)
    # a bf16 base is never copied
    bf16 = dataclasses.replace(request_for(tiny_model, qa_data), weight_cache=str(cache))
    assert SubprocessProbeRunner(timeout_seconds=300).run(bf16, tmp_path / "bf16").weights == (
        "original"
    )
    assert len(list(cache.iterdir())) == 1


def test_a_probe_of_more_steps_than_the_timed_ones_gets_its_timeout_in_proportion(tmp_path):
    request = request_for(tmp_path / "model", tmp_path / "data.jsonl", steps=40)
    runner = SubprocessProbeRunner(60, warm=False, timed_steps=40)
    assert runner.timeout_for(request) == 60
    assert runner.timeout_for(dataclasses.replace(request, steps=80)) == 120  # a confirmation
    assert runner.timeout_for(dataclasses.replace(request, steps=320)) == 480  # promoted twice
    assert runner.timeout_for(dataclasses.replace(request, steps=10)) == 60  # never shorter
    untimed = SubprocessProbeRunner(60, warm=False)
    assert untimed.timeout_for(dataclasses.replace(request, steps=80)) == 60
