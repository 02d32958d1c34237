"""Host memory measured, not only predicted: what a probe's offloading holds on the host is
counted from its tensors, stored beside the prediction, held to the host budget and shown."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from autotune.recipe import Recipe
from autotune.training.io import ProbeRequest, ProbeResult
from tests.conftest import write_jsonl
from tests.test_study import workspace  # noqa: F401 - the fixture


def _offload_probe(tiny_model, tmp_path, device="cpu", **fields) -> tuple[Recipe, ProbeResult]:
    """A probe as a study's child runs it (main writes the result file), of two-sequence
    steps cut to seq_len from long rows: the shape the replay steps. Eager attention and no
    dropout, whose CPU kernels save what CUDA's do, as in the replay tests."""
    from autotune.training.child import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    words = ("alpha", "beta", "gamma", "delta")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(words) for _ in range(300))} for _ in range(12)]
    recipe = Recipe.from_dict(
        {
            "model": str(tiny_model),
            "method": "lora",
            "lora_dropout": 0.0,
            "attention": "eager",
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "seq_len": 64,
            **fields,
        }
    )
    request = ProbeRequest(
        recipe=recipe,
        data_path=str(write_jsonl(tmp_path / "long.jsonl", rows)),
        steps=2,
        device=device,
        budget_bytes=10**12,
        seed=0,
    )
    (tmp_path / "request.json").write_text(request.to_json())
    assert main([str(tmp_path / "request.json"), str(tmp_path / "result.json")]) == 0
    result = ProbeResult.from_json((tmp_path / "result.json").read_text())
    assert result.status == "ok", result.reason
    return recipe, result


def test_a_cpu_probe_measures_the_host_memory_of_offloaded_activations_as_replayed(
    tiny_model, tmp_path, monkeypatch
):
    """The hooks count each host copy while autograd holds it: the probe's peak is the
    replay's to the byte once the replay's blocks are sized as the CPU's (no pinned allocator
    here); the replay's CUDA figure rounds each block up to a power of two, so it lies between
    the count and twice it. The figure reads back from the trial and the report shows it."""
    from autotune import host_memory
    from autotune.replay import load_config, replay
    from autotune.report.frame import trials_frame
    from autotune.report.table import TRIAL_COLUMNS, html_table
    from autotune.study.ranking import quality_ranking
    from autotune.study.records import (
        measured_points,
        record_prediction,
        record_probe_result,
        trial_record,
    )
    from autotune.units import format_bytes

    recipe, result = _offload_probe(tiny_model, tmp_path, activation_offload=True)
    measured = result.host_peak_bytes
    assert measured is not None and measured > 0
    assert result.host_rss_growth_bytes is not None and result.host_rss_growth_bytes > 0
    config = load_config(str(tiny_model))
    pinned = replay(recipe, config, cublas_workspace_bytes=0).host_peak_bytes
    assert measured <= pinned <= 2 * measured
    monkeypatch.setattr(host_memory, "pinned_host_bytes", lambda nbytes: int(nbytes))
    assert replay(recipe, config, cublas_workspace_bytes=0).host_peak_bytes == measured

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    trial = study.ask()
    record_prediction(trial, recipe, 10**6, {}, "replay", host_bytes=pinned)
    record_probe_result(trial, result)
    study.tell(trial, [1.0, 2.0, 3.0])
    record = trial_record(study.trials[0])
    assert record.predicted_host_bytes == pinned
    assert record.probe is not None and record.probe.host_peak_bytes == measured
    points = measured_points(study)
    page = html_table(
        trials_frame(study, points, quality_ranking(study, points)), TRIAL_COLUMNS, "trials"
    )
    assert "Measured host peak" in page and "Predicted host peak" in page
    assert f">{format_bytes(measured)}<" in page and f">{format_bytes(pinned)}<" in page


def test_a_probe_that_offloads_nothing_records_no_host_figure(tiny_model, tmp_path):
    _, result = _offload_probe(tiny_model, tmp_path)
    assert result.host_peak_bytes is None and result.host_rss_growth_bytes is None
    stored = json.loads(result.to_json())
    assert stored["host_peak_bytes"] is None
    # a result written before host figures existed reads back without them
    del stored["host_peak_bytes"], stored["host_rss_growth_bytes"]
    assert ProbeResult(**stored).host_peak_bytes is None


class CPUOffloadLayout(torch.optim.Optimizer):
    """torchao's CPUOffloadOptimizer (0.18) as it lays its tensors out, without CUDA: each
    trainable tensor of `minimal_size` elements or more gets a host copy with a host gradient
    (pinned there; not here, where nothing can pin) and an optimizer of its own over the copy;
    smaller ones an optimizer on the device (d_opt). The step copies each gradient to the host,
    steps there and copies the weights back, as torchao's does over its stream."""

    def __init__(self, params, minimal_size: int, **kwargs) -> None:  # noqa: ANN001
        self.param_d2h_map: dict = {}
        self.optim_dict: dict = {}
        retained = []
        for p_device in params:
            if p_device.numel() < minimal_size:
                retained.append(p_device)
                continue
            p_host = torch.empty_like(p_device, device="cpu")
            p_host.grad = torch.empty_like(p_host)
            p_host.copy_(p_device.detach())
            self.param_d2h_map[p_device] = p_host
            self.optim_dict[p_device] = torch.optim.AdamW([p_host], **kwargs)
        self.d_opt = torch.optim.AdamW(retained, **kwargs) if retained else None

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        if self.d_opt is not None:
            self.d_opt.step()
        for p_device, p_host in self.param_d2h_map.items():
            p_host.grad.copy_(p_device.grad)
            self.optim_dict[p_device].step()
            p_device.copy_(p_host)


def test_the_cpu_offload_optimizer_s_host_copies_and_states_are_counted_after_a_step():
    """Each large tensor's host copy, host gradient and two AdamW states (and its step count)
    are counted; the small tensors' states stay on the device and are not. On a GPU, any
    parameter, gradient or state on the CPU is host memory too (FSDP's offloaded shards)."""
    from autotune.optimizers import HOST_MIN_ELEMENTS
    from autotune.training.host_held import HostHeld, host_state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.LayerNorm(64))
    optimizer = CPUOffloadLayout(list(model.parameters()), HOST_MIN_ELEMENTS, lr=1e-3)
    model(torch.randn(4, 128)).sum().backward()
    optimizer.step()
    weight = model[0].weight
    assert weight.numel() >= HOST_MIN_ELEMENTS > model[0].bias.numel()
    step_count = optimizer.optim_dict[weight].state[optimizer.param_d2h_map[weight]]["step"]
    expected = 4 * weight.numel() * weight.element_size() + step_count.nbytes
    held = HostHeld()
    held.count_states(model, optimizer, "cpu")
    assert held.state_bytes == held.peak_bytes == expected

    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain.step()
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    tensors += [v for s in plain.state.values() for v in s.values()]
    assert host_state_bytes(model, plain, "cuda:0") == sum(t.nbytes for t in tensors)
    assert host_state_bytes(model, plain, "cpu") == 0


def test_a_measured_host_peak_over_the_host_budget_does_not_fit(workspace):  # noqa: F811
    """The prediction let the recipes through; their probes measured more host memory than the
    budget at micro-batch 2: those trials are measured but infeasible, with the reason, off the
    frontier; the rest show their host peak in `autotune status`."""
    from autotune.state_text import status_text
    from autotune.study import prepare_run, run_study
    from autotune.study.overview import study_status
    from autotune.study.records import TrialStatus, trial_record, trial_status
    from autotune.units import format_bytes
    from tests.test_study import DEMO_SPACE, FakeRunner, settings_for

    class OffloadRunner(FakeRunner):
        def run(self, request, workdir):  # noqa: ANN001, ANN201
            result = super().run(request, workdir)
            result.host_peak_bytes = 10**12 if request.recipe.micro_batch_size > 1 else 5 * 2**20
            return result

    tmp_path, _, _ = workspace
    space = tmp_path / "offload.yaml"
    text = DEMO_SPACE.read_text()
    for key, choices in (("method", "[lora]"), ("micro_batch_size", "[1, 2]")):
        text = re.sub(rf"^{key}: .*$", f"{key}: {choices}", text, flags=re.M)
    space.write_text(text + "activation_offload: [true]\n")
    settings = settings_for(workspace, space_path=space, trials=4, host_budget_bytes=10**11)
    study = run_study(prepare_run(settings), OffloadRunner())
    measured = [t for t in study.trials if trial_status(t) == TrialStatus.MEASURED]
    over = [t for t in measured if trial_record(t).probe.host_peak_bytes == 10**12]
    fitting = [t for t in measured if trial_record(t).probe.host_peak_bytes == 5 * 2**20]
    assert over and fitting
    for trial in over:
        assert max(trial.constraints.values()) > 0
        assert re.fullmatch(
            r"measured host memory 931\.32 GiB > host budget 93\.13 GiB",
            trial.user_attrs["reason"],
        )
        assert trial_record(trial).predicted_host_bytes > 0
    shown = status_text(study_status(settings.storage, settings.study_name))
    assert f"(host {format_bytes(5 * 2**20)})" in shown
    frontier_lines = shown.split("frontier so far")[1]
    assert not any(f"trial {t.number} " in frontier_lines for t in over)

    from types import SimpleNamespace

    from rich.console import Console

    from autotune.console import frontier_table
    from autotune.pareto import frontier
    from autotune.study.ranking import quality_ranking
    from autotune.study.records import measured_points

    console = Console(record=True, width=300)
    points = measured_points(study)
    ranking = quality_ranking(study, points)
    console.print(
        frontier_table(SimpleNamespace(frontier=frontier(points), study=study, ranking=ranking))
    )
    table = console.export_text()
    assert "host peak" in table and format_bytes(5 * 2**20) in table


@pytest.mark.gpu
def test_a_cuda_probe_counts_its_offloaded_activations_in_pinned_blocks(tiny_model, tmp_path):
    """On CUDA each host copy is pinned and counts the power-of-two block CUDA's host
    allocator gives it, as the replay prices it: the same tensors as on the CPU, rounded up."""
    from autotune.replay import load_config, replay

    _, on_cpu = _offload_probe(tiny_model, tmp_path / "cpu", activation_offload=True)
    recipe, on_cuda = _offload_probe(
        tiny_model, tmp_path / "cuda", device="cuda", activation_offload=True
    )
    predicted = replay(recipe, load_config(str(tiny_model))).host_peak_bytes
    assert on_cuda.host_peak_bytes == pytest.approx(predicted, rel=0.01)
    assert on_cpu.host_peak_bytes <= on_cuda.host_peak_bytes <= 2 * on_cpu.host_peak_bytes


def test_the_run_s_trial_line_shows_the_host_peak_and_why_it_does_not_fit():
    from rich.console import Console

    from autotune.console import ConsoleReporter, progress_bar
    from autotune.study.objective import TrialSummary
    from autotune.study.records import TrialStatus
    from autotune.units import format_bytes

    console = Console(record=True, width=300)
    reporter = ConsoleReporter(console)
    reporter._progress = progress_bar(console, transient=True)
    reporter._task = reporter._progress.add_task("trials", total=2)
    reason = "measured host memory 2.0 GiB > host budget 1.0 GiB"
    for host, why in ((3 * 2**20, ""), (2 * 2**30, reason)):
        reporter.trial_finished(
            TrialSummary(
                number=1,
                label="LoRA offload",
                status=TrialStatus.MEASURED,
                predicted_peak_bytes=2**30,
                peak_memory_bytes=2**29,
                tokens_per_second=100.0,
                eval_loss=2.0,
                reason=why,
                host_peak_bytes=host,
                predicted_host_bytes=4 * 2**20,
            )
        )
    fits, over = console.export_text().splitlines()[:2]
    assert f", host {format_bytes(3 * 2**20)} (predicted {format_bytes(4 * 2**20)})" in fits
    assert "does not fit" not in fits
    assert over.endswith(f"does not fit: {reason}")
