"""Checks that need a CUDA GPU: the warm probe path, paged optimizer states and a whole study.

They skip without CUDA (tests/conftest.py). On a GPU machine: `python -m pytest -m gpu tests`.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from autotune.memory import estimate
from autotune.model_spec import load_model_spec
from autotune.probe import SubprocessProbeRunner
from autotune.random_model import build_random_model
from tests.conftest import DEMO
from tests.test_cli import DEMO_SPACE, autotune
from tests.test_probe import request_for

pytestmark = pytest.mark.gpu

MID_SIZE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
"""About 100M parameters: 8-bit optimizer states large enough to see above allocator rounding."""


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    return build_random_model(
        MID_SIZE, tmp_path_factory.mktemp("models") / "mid-llama", DEMO / "tokenizer"
    )


def test_forked_probes_on_cuda_have_their_own_context(tiny_model, qa_data, tmp_path):
    runner = SubprocessProbeRunner(timeout_seconds=300, warm=True)
    try:
        results = [
            runner.run(request_for(tiny_model, qa_data, device="cuda"), tmp_path / f"p{i}")
            for i in range(2)
        ]
    finally:
        runner.close()
    for result in results:
        assert result.status == "ok", result.reason
        # forked from a server that never initialised CUDA, each child made its own context
        assert result.forked and result.memory_source == "cuda_max_reserved"
        assert result.cuda_context_bytes and result.cuda_context_bytes > 100 * 2**20
        assert result.peak_memory_bytes > result.cuda_context_bytes
    assert results[1].seconds["start"] < 1.0


def test_paged_optimizer_states_stay_outside_the_caching_allocator(mid_model, qa_data, tmp_path):
    recipe = dict(
        method="full",
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        seq_len=128,
        gradient_checkpointing=False,
    )
    runner = SubprocessProbeRunner(timeout_seconds=300)
    allocated = {}
    for optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        request = request_for(
            mid_model, qa_data, device="cuda", steps=2, optimizer=optimizer, **recipe
        )
        result = runner.run(request, tmp_path / optimizer)
        assert result.status == "ok", result.reason
        allocated[optimizer] = result.peak_allocated_bytes
    runner.close()
    paged = estimate(load_model_spec(str(mid_model)), request.recipe).paged_bytes
    assert paged > 150 * 2**20  # two 1-byte states of ~100M parameters
    # the allocator held everything but the paged states in both runs
    difference = allocated["adamw_8bit"] - allocated["paged_adamw_8bit"]
    assert difference == pytest.approx(paged, rel=0.2)


def test_study_on_cuda_end_to_end(tiny_model, qa_data, tmp_path):
    done = autotune(
        "run",
        *("--model", str(tiny_model), "--data", str(qa_data), "--budget", "8GB"),
        *("--space", DEMO_SPACE, "--trials", "3", "--probe-steps", "3", "--seq-len", "64"),
        *("--device", "cuda", "--confirm", "1", "--storage", f"sqlite:///{tmp_path}/s.db"),
        *("--study", "gpu"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "measured" in done.stdout and "CPU RSS" not in done.stdout
    table = tmp_path / "table.csv"
    report = autotune(
        "report",
        "--storage",
        f"sqlite:///{tmp_path}/s.db",
        "--study",
        "gpu",
        "--csv",
        str(table),
        cwd=tmp_path,
    )
    assert report.returncode == 0, report.stderr
    frame = pd.read_csv(table)
    measured = frame[frame["status"] == "measured"]
    assert len(measured) >= 1
    assert (measured["memory_source"] == "cuda_max_reserved").all()
    assert (measured["peak_memory_bytes"] <= 8e9).all()
    assert (measured["seconds_load"] > 0).all() and (measured["seconds_prepare"] >= 0).all()


def test_nf4_copy_on_cuda_trains_like_the_original(mid_model, qa_data, tmp_path):
    runner = SubprocessProbeRunner(timeout_seconds=300)
    request = request_for(mid_model, qa_data, device="cuda", quantization="nf4", seq_len=128)
    request = dataclasses.replace(request, weight_cache=str(tmp_path / "cache"))
    first = runner.run(request, tmp_path / "first")
    second = runner.run(request, tmp_path / "second")
    runner.close()
    assert (first.weights, second.weights) == ("original, nf4 cache written", "nf4 cache")
    assert second.eval_loss == pytest.approx(first.eval_loss, abs=1e-3)
    assert second.peak_memory_bytes <= first.peak_memory_bytes * 1.02


def test_a_probe_records_its_allocations_and_the_replay_reads_them(
    mid_model, qa_data, tmp_path, monkeypatch
):
    """With AUTOTUNE_MEMORY_HISTORY=1 a probe dumps the caching allocator's trace; its peak of
    reserved bytes is the probe's measured peak less the context, and bench/replay_diff.py
    sets it beside the replay's segments (the data's rows are shorter than the replay's, so
    only the first segments, the weights', are expected to agree)."""
    import pickle

    from autotune.replay import load_config, replay
    from autotune.training.child import MEMORY_HISTORY_ENV, MEMORY_SNAPSHOT_NAME
    from tests.conftest import load_bench

    monkeypatch.setenv(MEMORY_HISTORY_ENV, "1")
    request = request_for(
        mid_model,
        qa_data,
        device="cuda",
        steps=2,
        method="lora",
        micro_batch_size=2,
        seq_len=128,
    )
    result = SubprocessProbeRunner(timeout_seconds=300).run(request, tmp_path / "probe")
    assert result.status == "ok", result.reason
    snapshot = pickle.loads((tmp_path / "probe" / MEMORY_SNAPSHOT_NAME).read_bytes())
    gpu, peak = load_bench("replay_diff").gpu_reservations(snapshot)
    assert gpu and peak == result.peak_memory_bytes - result.cuda_context_bytes
    replayed = replay(request.recipe, load_config(str(mid_model)))
    # the first segment, the small pool's 2 MiB, for the first request: the GPU's trace records
    # the bytes asked for (4 on an H200), the replay the block they take (512)
    assert gpu[0][0] == replayed.reservations[0][0] == 2 * 2**20
    assert 0 < gpu[0][1] <= replayed.reservations[0][1] == 512
    lines = load_bench("replay_diff").side_by_side(gpu, replayed.reservations)
    assert len(lines) == max(len(gpu), len(replayed.reservations))


MID_MIXTRAL = {
    **{k: v for k, v in MID_SIZE.items() if k not in ("model_type", "architectures")},
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "intermediate_size": 1408,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}
"""About 200M parameters, most of them in stacked expert weights."""


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_mixture_of_experts_allocates_on_cuda_what_the_replay_predicts(
    tmp_path_factory, quantization
):
    """The experts' grouped matmul on CUDA (its bf16 kernel; k-bit preparation keeps the stacked
    weights in bf16 under QLoRA too) against the replay of the same probe: allocated peaks
    within 5%."""
    from autotune.replay import load_config, replay
    from tests.conftest import load_bench

    models = tmp_path_factory.mktemp("moe")
    model = build_random_model(MID_MIXTRAL, models / "mid-mixtral", DEMO / "tokenizer")
    # rows far longer than seq_len: every probe row is full length, as the replay's are
    data = load_bench("shared").long_rows(models / "long.jsonl", rows=40)
    request = request_for(
        model,
        data,
        device="cuda",
        steps=2,
        lora_target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        quantization=quantization,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        seq_len=512,
        gradient_checkpointing=True,
    )
    result = SubprocessProbeRunner(timeout_seconds=300).run(request, models / quantization)
    assert result.status == "ok", result.reason
    replayed = replay(request.recipe, load_config(str(model)))
    assert replayed.peak_allocated_bytes == pytest.approx(result.peak_allocated_bytes, rel=0.05)
