"""The study's bookkeeping with a fake probe runner: fast, and every outcome is covered."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from autotune.errors import UsageError
from autotune.export import recipe_yaml
from autotune.margins import MemoryMargin, memory_margin
from autotune.memory import estimate
from autotune.prediction import probe_rows
from autotune.recipe import Recipe
from autotune.report import render_html, report_data
from autotune.study import (
    CONSTRAINT_KEY,
    OBJECTIVE_NAMES,
    RunEvents,
    RunSettings,
    load_existing_study,
    make_objective,
    measured_points,
    open_study,
    prepare_run,
    run_study,
    space_tried,
    trial_record,
)
from autotune.training.io import ProbeRequest, ProbeResult
from autotune.units import format_bytes
from tests.conftest import DEMO, ROOT, write_jsonl

DEMO_SPACE = Path(__file__).resolve().parent.parent / "autotune" / "search_spaces" / "demo.yaml"


class FakeRunner:
    """Figures that follow the recipe, so frontier and picks are predictable."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.fail = fail or {}
        self.requests: list[ProbeRequest] = []

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        self.requests.append(request)
        recipe = request.recipe
        for needle, status in self.fail.items():
            if needle in recipe.label():
                return ProbeResult(
                    status=status, reason=f"fake {status}", device="cpu", peak_memory_bytes=123
                )
        return ProbeResult(
            status="ok",
            device="cpu",
            memory_source="cpu_peak_rss_delta",
            peak_memory_bytes=10_000_000 * recipe.micro_batch_size + (recipe.lora_r or 50),
            tokens_per_second=1000.0 * recipe.micro_batch_size,
            eval_loss=3.0 - 0.01 * (recipe.lora_r or 10),
            steps_done=request.steps,
        )


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "config-only-model"
    model.mkdir()
    shutil.copy(DEMO / "config.json", model / "config.json")
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, model / item.name)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(30)])
    return tmp_path, model, data


@pytest.fixture()
def full_rows_workspace(workspace):
    """The workspace with data whose examples all reach seq_len 64 (truncated there): each
    micro-batch is seq_len wide, so budgets drawn from seq_len-wide peaks hold for the space's
    sizing and the trials' predictions, which take the rows the data gives."""
    tmp_path, model, _ = workspace
    rows = [{"text": f"{i} " + "word " * 99} for i in range(30)]
    return tmp_path, model, write_jsonl(tmp_path / "full-rows.jsonl", rows)


def settings_for(workspace, **changes) -> RunSettings:
    tmp_path, model, data = workspace
    base = dict(
        model=str(model),
        data_path=data,
        budget_bytes=10**10,
        space_path=DEMO_SPACE,
        trials=6,
        probe_steps=3,
        seq_len=64,
        device="cpu",
        storage=f"sqlite:///{tmp_path}/study.db",
        study_name="s",
        # the tests reason about the formula's predictions, as they are (no margin);
        # test_trials_are_predicted_by_replay runs the replay memory model, and
        # test_the_measured_margin_rules_out_what_only_fits_without_it the margin
        memory_model="formula",
        memory_margin=0.0,
    )
    return RunSettings(**{**base, **changes})


def test_run_records_measured_trials_and_resumes(workspace):
    runner = FakeRunner()
    study = run_study(prepare_run(settings_for(workspace)), runner)
    assert len(study.trials) == 6
    assert study.metric_names == list(OBJECTIVE_NAMES)
    # The first trial is the enqueued QLoRA default, moved into the demo space.
    first = Recipe.from_dict(study.trials[0].user_attrs["recipe"])
    assert (first.method, first.quantization, first.micro_batch_size) == ("lora", "nf4", 1)
    for trial in study.trials:
        assert CONSTRAINT_KEY in {k.split(":")[-1] for k in trial.system_attrs if ":" in k}
        assert trial.user_attrs["predicted_peak_bytes"] > 0
        assert trial.system_attrs["constraints"] == [trial.constraints[CONSTRAINT_KEY]]
    measured = [t for t in study.trials if t.user_attrs["status"] == "measured"]
    probes = [r for r in runner.requests if r.seed == 0]
    assert len(probes) == len(measured) >= 2
    assert all(r.steps == 3 and r.recipe.seq_len == 64 for r in probes)

    again = run_study(prepare_run(settings_for(workspace)), runner)
    assert len(again.trials) == 6
    more = run_study(prepare_run(settings_for(workspace, trials=8)), runner)
    assert len(more.trials) == 8


def test_a_study_refuses_fp16_weights_with_torch_adamw_without_probing(workspace):
    """A space of fp16 full fine-tuning with adamw and adamw_8bit: the trials that name adamw
    keep fp16 moments (recipe_checks.fp16_moments_refusal) and are refused, infeasible, with
    the reason, and never probed; those with 8-bit moments are probed."""
    tmp_path, _, _ = workspace
    space = tmp_path / "fp16.yaml"
    text = DEMO_SPACE.read_text()
    for key, choices in (("method", "[full]"), ("precision", "[fp16]"), ("quantization", "[none]")):
        text = re.sub(rf"^{key}: .*$", f"{key}: {choices}", text, flags=re.M)
    space.write_text(text)
    runner = FakeRunner()
    study = run_study(prepare_run(settings_for(workspace, space_path=space, trials=6)), runner)
    optimizers = {
        t.number: Recipe.from_dict(t.user_attrs["recipe"]).optimizer for t in study.trials
    }
    refused = [t for t in study.trials if t.user_attrs["status"] == "refused"]
    assert refused and all(optimizers[t.number] == "adamw" for t in refused)
    assert all("AdamW moments in fp16" in t.user_attrs["reason"] for t in refused)
    assert all(t.constraints[CONSTRAINT_KEY] > 0 for t in refused)  # infeasible
    assert runner.requests and {r.recipe.optimizer for r in runner.requests} == {"adamw_8bit"}
    assert "refused: cannot train (not run)" in render_html(
        report_data(study)
    )  # stored recipes read


def test_a_study_searches_what_trains_above_the_frozen_blocks(workspace):
    tmp_path, _, _ = workspace
    space = tmp_path / "freeze.yaml"
    text = DEMO_SPACE.read_text()
    for key, choices in (
        ("method", "[freeze]"),
        ("quantization", "[none]"),
        ("micro_batch_size", "[1]"),
        ("gradient_checkpointing", "[true]"),
        ("optimizer", "[adamw]"),
    ):
        text = re.sub(rf"^{key}: .*$", f"{key}: {choices}", text, flags=re.M)
    space.write_text(text + "train_modules: [all, attention, mlp]\n")
    runner = FakeRunner()
    study = run_study(prepare_run(settings_for(workspace, space_path=space, trials=8)), runner)
    # its three recipes, one per train_modules, tried: the run ends short of --trials 8
    assert space_tried(study) == 3 and len(study.trials) < 8
    chosen = {Recipe.from_dict(t.user_attrs["recipe"]).train_modules for t in study.trials}
    assert chosen == {"all", "attention", "mlp"}
    assert {t.params["train_modules"] for t in study.trials} == chosen
    assert {r.recipe.train_modules for r in runner.requests if r.seed == 0} == chosen
    predicted = {
        Recipe.from_dict(t.user_attrs["recipe"]).train_modules: t.user_attrs["predicted_peak_bytes"]
        for t in study.trials
    }
    assert predicted["attention"] < predicted["all"] and predicted["mlp"] < predicted["all"]


def test_over_budget_recipes_are_complete_infeasible_and_never_probed(workspace):
    tmp_path, model, _ = workspace
    # rows truncated at seq_len: every probe's rows are seq_len wide
    data = write_jsonl(
        tmp_path / "long.jsonl", [{"text": f"{i} " + "word " * 99} for i in range(30)]
    )
    prepared = prepare_run(settings_for(workspace, budget_bytes=10**12, data_path=data))
    assert prepared.train_token_lengths == (64, 64)

    def predicted(params):  # of the rows the data gives the probe, as the study predicts
        recipe = prepared.space.build(params, str(model), prepared.spec, 64)
        rows = probe_rows(recipe, prepared.train_token_lengths)
        return estimate(prepared.spec, recipe, rows.width, rows.padded).peak_bytes

    sizes = sorted(predicted(p) for p in prepared.space.all_params())
    budget = sizes[len(sizes) // 3]  # a third of the space fits
    runner = FakeRunner()
    settings = settings_for(workspace, budget_bytes=budget, trials=10, data_path=data)
    study = run_study(prepare_run(settings), runner)
    skipped = [t for t in study.trials if t.user_attrs["status"] == "over_budget_predicted"]
    assert skipped, "some recipe should be predicted over budget"
    for trial in skipped:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.constraints[CONSTRAINT_KEY] > 0
        assert all(math.isfinite(v) for v in trial.values)
        assert trial.values[0] == trial.user_attrs["predicted_peak_bytes"] > budget
    probed = {r.recipe.label() for r in runner.requests}
    assert not probed & {t.user_attrs["recipe_label"] for t in skipped}
    assert all(p.number not in {t.number for t in skipped} for p in measured_points(study))


def test_failures_become_recorded_trials(workspace):
    runner = FakeRunner(fail={"QLoRA": "oom", "freeze": "crash", "full": "nan"})
    study = run_study(prepare_run(settings_for(workspace, trials=10)), runner)
    states = {t.user_attrs.get("status"): t for t in study.trials}
    assert states["oom"].state == optuna.trial.TrialState.COMPLETE
    assert states["oom"].constraints[CONSTRAINT_KEY] > 0
    assert states["oom"].user_attrs["reason"] == "fake oom"
    if "crash" in states:
        assert states["crash"].state == optuna.trial.TrialState.FAIL
        assert states["crash"].user_attrs["reason"] == "fake crash"
    assert len(study.trials) == 10


def test_export_and_report_from_the_study(workspace):
    study = run_study(prepare_run(settings_for(workspace, trials=8)), FakeRunner())
    recipe, text = recipe_yaml(study, "fastest")
    data = yaml.safe_load(text)
    assert Recipe.from_yaml(text) == recipe
    fastest = max(measured_points(study), key=lambda p: p.tokens_per_second)
    assert data["measured"]["tokens_per_second"] == pytest.approx(fastest.tokens_per_second)
    # the prediction with the margin the study held it to (none in these tests), against the
    # budget: 10 GB with the prediction's distance to it to spare
    predicted = data["measured"]["predicted_peak_bytes"]
    assert data["measured"]["memory_margin"] == 0.0
    assert data["measured"]["predicted_fit"].startswith(f"predicted {format_bytes(predicted)}")
    assert (
        f"fits {format_bytes(10**10)} with {format_bytes(10**10 - predicted)} to spare"
        in (data["measured"]["predicted_fit"])
    )
    report = report_data(study)
    assert report.frontier_numbers and fastest.number in report.frontier_numbers
    assert report.data_text.startswith("Data: 30 rows; tokens per row p50 ")
    assert "longer than seq_len 64" in report.data_text
    assert len(report.frame) == 8
    page = render_html(report)
    assert "Plotly.newPlot" in page and "chart-0" in page and "chart-1" in page
    assert page.count("Plotly.newPlot") >= 5  # pareto, two projections, 3-D, parallel, memory
    assert "not GPU memory" in page  # says which memory figure was used
    default = report.frame[report.frame["baseline"] == "qlora_default"].iloc[0]
    fastest_row = report.frame[report.frame["trial"] == fastest.number].iloc[0]
    speedup = fastest_row["tokens_per_second"] / default["tokens_per_second"]
    assert report.readings[0].startswith("fastest under 10 GB: ")
    assert f"{speedup:.1f}x the QLoRA default" in report.readings[0]
    assert set(report.importances) <= {"peak_memory_bytes", "tokens_per_second", "eval_loss"}
    from autotune.report import write_report

    tmp_path = workspace[0]
    write_report(study, tmp_path / "r.html", tmp_path / "trials.csv")
    import pandas as pd

    table = pd.read_csv(tmp_path / "trials.csv")
    assert len(table) == 8 and {"trial", "tokens_per_second", "held_up"} <= set(table.columns)
    # sizes in bytes and LoRA ranks are whole numbers, as the recipe and export write them
    raw = pd.read_csv(tmp_path / "trials.csv", dtype=str)
    for column in ("peak_memory_bytes", "predicted_peak_bytes", "param_lora_r"):
        cells = raw[column].dropna()
        assert len(cells) and cells.str.fullmatch(r"\d+").all(), (column, list(cells))


def test_an_axolotl_export_names_the_data_formats_the_run_found_without_the_file(workspace):
    tmp_path, _, data = workspace
    rows = [{"text": "row 0"}] + [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(29)]
    write_jsonl(data, rows)
    study = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    data.unlink()  # the study's record of its data is read, not the file
    from autotune.study.study_records import study_setup

    # and of its model: whether a freeze recipe's head is a parameter of its own to export
    assert study_setup(study).tie_word_embeddings is False
    # and where its freeze recipes train, which the exports' freeze patterns name
    layout = study_setup(study).freeze_layout
    assert layout["blocks"] == "model.layers" and layout["parts"]["attention"][0] == "self_attn"
    exported = recipe_yaml(study, "balanced", "axolotl")[1]
    assert yaml.safe_load(exported)["datasets"][0]["type"] == "completion"  # the first row's
    assert "# the data mixes formats (alpaca 29, text 1)" in exported
    # a study from before the formats were stored scans the file, where it still is
    from autotune.study.study_records import DATA_STATS_ATTR, FORMATS_KEY

    earlier = {k: v for k, v in study.user_attrs[DATA_STATS_ATTR].items() if k != FORMATS_KEY}
    study.set_user_attr(DATA_STATS_ATTR, earlier)
    write_jsonl(data, rows[1:] + rows[:1])
    rescanned = recipe_yaml(study, "balanced", "axolotl")[1]
    assert yaml.safe_load(rescanned)["datasets"][0]["type"] == "alpaca"
    assert "# the data mixes formats (alpaca 29, text 1)" in rescanned
    data.unlink()
    assert "mixes formats" not in recipe_yaml(study, "balanced", "axolotl")[1]


class SlowerWhenLonger(FakeRunner):
    """Confirmation probes (seed 1) of micro-batch 4 recipes come back 30% slower."""

    def run(self, request, workdir):
        result = super().run(request, workdir)
        if request.seed == 1 and request.recipe.micro_batch_size == 4 and result.tokens_per_second:
            result.tokens_per_second *= 0.7
        return result


def test_top_frontier_recipes_are_confirmed_longer_with_another_seed(workspace):
    runner = SlowerWhenLonger()
    study = run_study(prepare_run(settings_for(workspace, trials=8, confirm_top=2)), runner)
    confirms = [r for r in runner.requests if r.seed == 1 and r.steps == 6]
    assert len(confirms) == 2
    from autotune.study import confirmations

    confirmed = confirmations(study)
    assert len(confirmed) == 2
    for number, confirmation in confirmed.items():
        slower = study.trials[number].user_attrs["recipe"]["micro_batch_size"] == 4
        assert confirmation.held_up is (not slower)
        assert confirmation.speed_change == pytest.approx(-0.3 if slower else 0.0)
    frame = report_data(study).frame
    assert set(frame.loc[frame["held_up"].notna(), "trial"]) == set(confirmed)
    # Resuming does not confirm the same recipes again.
    run_study(prepare_run(settings_for(workspace, trials=8, confirm_top=2)), runner)
    assert len([r for r in runner.requests if r.seed == 1 and r.steps == 6]) == 2
    fastest = max(measured_points(study), key=lambda p: p.tokens_per_second).number
    if fastest in confirmed:
        exported = yaml.safe_load(recipe_yaml(study, "fastest")[1])["measured"]["confirmation"]
        assert exported["verdict"] == confirmed[fastest].words()


class ConfirmationOf(FakeRunner):
    """The confirmation probe (seed 1, twice the steps) of one recipe ends as `outcome`: a probe
    status, "slow" for half the first probe's tokens/s or "fast" for half as much again."""

    def __init__(self, recipe: Recipe, outcome: str) -> None:
        super().__init__()
        self.recipe, self.outcome = recipe, outcome

    def run(self, request, workdir):
        result = super().run(request, workdir)
        if request.seed != 1 or request.steps != 6 or request.recipe != self.recipe:
            return result
        if self.outcome in ("slow", "fast"):
            factor = 0.5 if self.outcome == "slow" else 1.5
            return dataclasses.replace(result, tokens_per_second=result.tokens_per_second * factor)
        return ProbeResult(status=self.outcome, reason=f"fake {self.outcome}", device="cpu")


@pytest.mark.parametrize(
    ("outcome", "leaves"),
    [("oom", "ran out of memory"), ("nan", "had a non-finite loss"), ("slow", ""), ("timeout", "")],
)
def test_a_recipe_whose_confirmation_fails_on_memory_or_loss_leaves_the_frontier(
    workspace, outcome, leaves
):
    from rich.console import Console

    from autotune.console import ConsoleReporter
    from autotune.state_text import status_text
    from autotune.study import confirmations, pick_number, quality_ranking, study_status

    settings = settings_for(workspace, trials=8, confirm_top=0)
    study = run_study(prepare_run(settings), FakeRunner())
    points = measured_points(study)
    balanced = pick_number("balanced", points, quality_ranking(study, points))
    runner = ConfirmationOf(Recipe.from_dict(study.trials[balanced].user_attrs["recipe"]), outcome)
    # resumed with one confirmation: the balanced pick's
    lines = io.StringIO()
    with ConsoleReporter(Console(file=lines, width=300)) as console:
        study = run_study(
            prepare_run(dataclasses.replace(settings, confirm_top=1)), runner, console
        )
    confirmed = confirmations(study)
    assert not confirmed[balanced].held_up
    exported, exported_text = recipe_yaml(study, "balanced")
    row = report_data(study).frame.set_index("trial").loc[balanced]
    status = status_text(study_status(settings.storage, "s"))
    if not leaves:  # a speed off the first probe is chance; a timeout says nothing sure
        assert list(confirmed) == [balanced]
        assert balanced in {p.number for p in measured_points(study)}
        assert exported == runner.recipe and bool(row["on_frontier"])
        assert "left the frontier" not in row["reason"] + status + lines.getvalue()
        return
    assert balanced not in {p.number for p in measured_points(study)}
    assert exported != runner.recipe and not row["on_frontier"]
    why = f"left the frontier: its confirmation {leaves} (fake {outcome})"
    assert row["reason"] == why
    assert f"trial {balanced} {why}" in status
    assert f"trial {balanced} {why}; the picks and the exported recipe" in lines.getvalue()
    page = render_html(report_data(study))
    assert f"Trial {balanced} ({runner.recipe.label()}) {why}" in page
    # the recipe the balanced pick chooses now is confirmed in its place, in the same run
    points = measured_points(study)
    stand_in = pick_number("balanced", points, quality_ranking(study, points))
    assert set(confirmed) == {balanced, stand_in}
    assert confirmed[stand_in].in_place_of == balanced and confirmed[stand_in].held_up
    assert yaml.safe_load(exported_text)["measured"]["confirmation"]["held_up"] is True
    assert (
        f"confirm trial {stand_in} (6 steps, seed 1), in place of trial {balanced} as the "
        "balanced pick: held up" in lines.getvalue()
    )
    in_place = f"trial {stand_in}, which the balanced pick chose next, was confirmed: held up"
    assert f"trial {balanced} {why}; in its place, {in_place}" in status
    assert f"In its place, {in_place}" in page
    # resuming chooses the same recipes to confirm: no other is probed again
    run_study(prepare_run(dataclasses.replace(settings, confirm_top=1)), runner)
    assert len([r for r in runner.requests if r.seed == 1 and r.steps == 6]) == 2


def test_a_confirmation_faster_beyond_the_tolerance_holds_up_wherever_it_is_told(workspace):
    """A longer probe well faster than the first says how much the speed varies here, not that
    the recipe failed: the run's lines, the report, the card and the export say it held up."""
    from rich.console import Console

    from autotune.console import ConsoleReporter
    from autotune.state_text import status_text
    from autotune.study import confirmations, pick_number, quality_ranking, study_status

    settings = settings_for(workspace, trials=8, confirm_top=0)
    study = run_study(prepare_run(settings), FakeRunner())
    points = measured_points(study)
    balanced = pick_number("balanced", points, quality_ranking(study, points))
    runner = ConfirmationOf(Recipe.from_dict(study.trials[balanced].user_attrs["recipe"]), "fast")
    lines = io.StringIO()
    with ConsoleReporter(Console(file=lines, width=300)) as console:
        study = run_study(
            prepare_run(dataclasses.replace(settings, confirm_top=1)), runner, console
        )
    confirmation = confirmations(study)[balanced]
    assert confirmation.held_up and confirmation.speed_change == pytest.approx(0.5)
    said = "50% faster than the first probe (its speed varies by more than ±15% here)"
    assert confirmation.words().startswith("held up: ") and confirmation.words().endswith(said)
    assert f"confirm trial {balanced} (6 steps, seed 1): held up: " in lines.getvalue()
    data = report_data(study)
    row = data.frame.set_index("trial").loc[balanced]
    assert bool(row["held_up"]) and row["confirmation"] == confirmation.words()
    card = next(c for c in data.cards if c.trial == balanced)
    assert card.held_up is True and card.confirmation == confirmation.words()
    exported = yaml.safe_load(recipe_yaml(study, "balanced")[1])["measured"]["confirmation"]
    assert exported["held_up"] is True and exported["verdict"] == confirmation.words()
    everything = lines.getvalue() + status_text(study_status(settings.storage, "s"))
    assert "did not hold up" not in everything + render_html(data)


def test_confirmations_in_place_of_recipes_that_left_are_at_most_one_each(workspace):
    """Every confirmation runs out of memory: the balanced pick's recipe leaves, the one the
    pick chooses next is confirmed in its place and leaves too, and the run stops there (one
    more confirmation for the one of the top --confirm that left), its card not confirmed."""
    from autotune.study import confirmations, pick_number, quality_ranking

    class EveryConfirmationOutOfMemory(FakeRunner):
        def run(self, request, workdir):
            result = super().run(request, workdir)
            if request.seed == 1 and request.steps == 6:
                return ProbeResult(status="oom", reason="fake oom", device="cpu")
            return result

    runner = EveryConfirmationOutOfMemory()
    study = run_study(prepare_run(settings_for(workspace, trials=8, confirm_top=1)), runner)
    confirmed = confirmations(study)
    assert len([r for r in runner.requests if r.seed == 1 and r.steps == 6]) == 2
    (first,) = [n for n, c in confirmed.items() if c.in_place_of is None]
    (second,) = [n for n, c in confirmed.items() if c.in_place_of == first]
    assert all(c.removal() for c in confirmed.values())
    points = measured_points(study)
    assert len(points) >= 1 and {first, second}.isdisjoint(p.number for p in points)
    assert pick_number("balanced", points, quality_ranking(study, points)) not in confirmed
    data = report_data(study)
    assert data.cards[0].confirmation is None and data.cards[0].held_up is None
    assert "<dt>Confirmation</dt><dd>not confirmed</dd>" in render_html(data)


def test_a_confirmation_over_the_budget_removes_its_recipe_one_off_in_speed_does_not():
    from autotune.study import Confirmation

    def confirmation(**changes):
        figures = dict(status="ok", reason="", steps=6, seed=1, peak_memory_bytes=2 * 1024**3)
        figures |= dict(tokens_per_second=700.0, eval_loss=2.5, speed_change=-0.3, held_up=False)
        return Confirmation(**{**figures, **changes})

    over = confirmation(speed_change=0.0, over_budget=True)
    assert over.removal() == "its confirmation peaked at 2.00 GiB, over the budget"
    assert "peak went over the budget" in confirmation(over_budget=True).words()
    assert confirmation(over_budget=False).removal() is None
    # a study from before the field: a miss within the speed tolerance was the peak's
    assert confirmation(speed_change=0.1).removal() is not None
    assert confirmation().removal() is None
    assert confirmation(status="crash", reason="boom", held_up=False).removal() is None


class NoisyRunner(FakeRunner):
    """Another seed moves eval loss by 0.02 and tokens/s by 3%, as chance would."""

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        result = super().run(request, workdir)
        if result.status == "ok" and request.seed:
            result.eval_loss += 0.02
            result.tokens_per_second *= 1.03
        return result


class NearTiesRunner(FakeRunner):
    """Eval loss rises by 0.0001 with each step of micro-batch, which also buys speed, and
    another seed moves it by 0.00015: the lowest eval loss is a slow recipe with a faster one
    within the noise of it."""

    def run(self, request, workdir):
        result = super().run(request, workdir)
        if result.status == "ok":
            chance = 0.00015 if request.seed else 0.0
            result.eval_loss = 3.0 + 0.0001 * request.recipe.micro_batch_size + chance
        return result


def test_eval_loss_noise_is_measured_once_and_read_against(workspace):
    runner = NoisyRunner()
    settings = settings_for(workspace, trials=8, confirm_top=1)
    prepared = prepare_run(settings)
    study = run_study(prepared, runner)
    noise_probes = [r for r in runner.requests if r.seed == 1 and r.steps == settings.probe_steps]
    assert len(noise_probes) == 1
    # Re-probes read the study's tokens: no second tokenization, the same eval subset.
    reseeded = [r for r in runner.requests if r.seed == 1]
    assert len(reseeded) == 2 and {r.token_cache for r in reseeded} == {prepared.token_cache}
    noise = study.user_attrs["noise"]
    default = next(t for t in study.trials if t.user_attrs.get("baseline") == "qlora_default")
    assert noise["trial"] == default.number
    assert noise_probes[0].recipe == Recipe.from_dict(default.user_attrs["recipe"])
    assert noise["eval_loss_difference"] == pytest.approx(0.02)
    assert noise["tokens_per_second_change"] == pytest.approx(0.03)
    assert noise["peak_memory_change"] == 0
    readings = report_data(study).readings
    assert readings[-1].startswith(f"Noise: trial {default.number} probed again with seed 1")
    compared = [line for line in readings if "the QLoRA default" in line]
    assert compared and all(
        ("within noise" in line) != ("beyond noise" in line) for line in compared
    )
    run_study(prepare_run(settings), runner)
    assert len([r for r in runner.requests if r.seed == 1 and r.steps == settings.probe_steps]) == 1


class NoiseProbeFails(NoisyRunner):
    """The noise probe (the first probe of the study's length with another seed) times out."""

    def run(self, request, workdir):
        result = super().run(request, workdir)
        if request.seed == 1 and not any(r.seed == 1 for r in self.requests[:-1]):
            return ProbeResult(status="timeout", reason="fake timeout", device="cpu")
        return result


def test_a_failed_noise_probe_is_recorded_and_not_probed_again(workspace):
    """A noise probe that fails is recorded as failed: a later run does not measure the noise
    after the confirmations chose without it (its best-loss pick would move off them)."""
    settings = settings_for(workspace, trials=8, confirm_top=1)
    events = RunEvents()
    study = run_study(prepare_run(settings), NoiseProbeFails(), events)
    assert study.user_attrs["noise_failed"] == "timeout" and "noise" not in study.user_attrs
    assert any("the noise probe" in n and "ended timeout: fake timeout" in n for n in events.notes)
    runner = NoisyRunner()
    study = run_study(prepare_run(settings), runner)
    assert runner.requests == [] and "noise" not in study.user_attrs


def test_a_run_waits_for_the_noise_another_run_is_probing(workspace, monkeypatch):
    """While another run holds the noise probe's claim, a run waits for its noise before the
    confirmations choose, rather than choosing without it."""
    from autotune.study import confirm
    from autotune.study.study_records import Noise, record_noise

    settings = settings_for(workspace, trials=8, confirm_top=0)
    study = run_study(prepare_run(settings), NoisyRunner())
    assert "noise" not in study.user_attrs  # --confirm 0 measured none
    # another run on the study holds the claim, and records the noise a moment later
    monkeypatch.setattr(confirm, "claim_once", lambda *a, **k: False)
    waits = []
    other = Noise(
        trial=0,
        seed=1,
        steps=3,
        eval_loss=3.0,
        eval_loss_difference=0.01,
        tokens_per_second_change=0.0,
        peak_memory_change=0.0,
    )

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:
            record_noise(study, other)

    monkeypatch.setattr(confirm.time, "sleep", sleep)
    prepared = prepare_run(dataclasses.replace(settings, confirm_top=1))
    runner = NoisyRunner()
    assert confirm.measure_noise(prepared, runner, study) == other
    assert len(waits) == 3 and runner.requests == []


def test_existing_study_with_other_objectives_is_refused(workspace):
    tmp_path, _, _ = workspace
    url = f"sqlite:///{tmp_path}/other.db"
    optuna.create_study(storage=url, study_name="s", directions=["minimize"])
    with pytest.raises(UsageError, match="other objectives"):
        open_study(url, "s")


def test_load_existing_study_errors(workspace):
    tmp_path, _, _ = workspace
    with pytest.raises(UsageError, match="run `autotune run` first"):
        load_existing_study(None, None)
    url = f"sqlite:///{tmp_path}/x.db"
    run_study(prepare_run(settings_for(workspace, storage=url, trials=2)), FakeRunner())
    with pytest.raises(UsageError, match="no study 'nope'.*holds: s"):
        load_existing_study(url, "nope")
    assert load_existing_study(url, None).study_name == "s"


def test_budget_below_the_smallest_recipe_says_how_much(workspace):
    with pytest.raises(UsageError, match=r"below the .* that the smallest recipe") as error:
        prepare_run(settings_for(workspace, budget_bytes=1000))
    assert "GB" in str(error.value)


def test_too_few_rows_for_one_effective_batch(workspace):
    tmp_path, _, _ = workspace
    data = write_jsonl(tmp_path / "few.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    with pytest.raises(UsageError, match="fewer than one effective batch"):
        prepare_run(settings_for(workspace, data_path=data))


def test_events_report_each_trial(workspace):
    seen = []
    events = RunEvents(trial_finished=seen.append)
    run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner(), events)
    assert [s.number for s in seen] == [0, 1, 2]
    assert all(s.predicted_peak_bytes > 0 for s in seen)


class TimedRunner(FakeRunner):
    """FakeRunner whose probes say where their time went; loading grows with micro-batch."""

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        result = super().run(request, workdir)
        result.seconds = {
            "start": 0.1,
            "device_init": 0.2,
            "data": 0.3,
            "load": 1.0 * request.recipe.micro_batch_size,
            "prepare": 0.4,
            "warmup": 0.5,
            "steps": 2.0,
            "eval": 0.6,
        }
        result.seconds["total"] = sum(result.seconds.values())
        return result


def test_report_shows_where_each_probe_spent_its_time(workspace):
    study = run_study(prepare_run(settings_for(workspace, trials=6)), TimedRunner())
    report = report_data(study)
    frame = report.frame
    probed = frame[frame["seconds_total"].notna() & (frame["status"] != "duplicate")]
    assert len(probed) >= 2
    assert frame["trial_seconds"].notna().all()
    assert report.time_text.startswith("Time: 6 trials in ")
    assert " min while trials ran (" in report.time_text
    assert f"{len(probed)} probed" in report.time_text
    assert f"load {probed['seconds_load'].median():.1f} s" in report.time_text
    assert "prepare 0.4 s" in report.time_text and "eval 0.6 s" in report.time_text
    page = render_html(report)
    assert "Where each probe" in page and "Probe prepare (s)" in page


@pytest.fixture()
def qwen2_7b_workspace(workspace):
    """The workspace with a config-only Qwen2-7B (weights are never loaded: FakeRunner) and
    data whose examples all reach seq_len 1024 (truncated there), so every recipe's rows are
    seq_len wide, as in the GPU benchmark's study."""
    tmp_path = workspace[0]
    data = write_jsonl(
        tmp_path / "long-rows.jsonl", [{"text": f"{i} " + "word " * 1100} for i in range(30)]
    )
    model = tmp_path / "qwen2-7b"
    model.mkdir()
    shutil.copy(DEMO.parent / "bench" / "configs" / "qwen2-7b.json", model / "config.json")
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, model / item.name)
    return tmp_path, model, data


def qwen2_7b_settings(workspace, trials: int) -> RunSettings:
    """The 7B study of the GPU benchmark: the default space as it was before it searched DoRA,
    activation offload, the chunked and fused losses, the CPU-offload optimizer and freeze's
    train_modules (with them micro-batch 8 fits 24 GB), 24 GB, seq 1024."""
    tmp_path = workspace[0]
    space = tmp_path / "default-before-techniques.yaml"
    text = (DEMO.parent / "autotune" / "search_spaces" / "default.yaml").read_text()
    for key, value in (
        ("use_dora", "false"),
        ("activation_offload", "false"),
        ("loss", "standard"),
        ("train_modules", "all"),
        ("optimizer", "[adamw, adamw_8bit, paged_adamw_8bit]"),
    ):
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    space.write_text(text)
    return settings_for(
        workspace, budget_bytes=24 * 10**9, space_path=space, seq_len=1024, trials=trials
    )


def test_choices_no_recipe_fits_with_are_not_searched(qwen2_7b_workspace):
    from autotune.study import BudgetQuery, budget_fit

    settings = qwen2_7b_settings(qwen2_7b_workspace, trials=12)
    prepared = prepare_run(settings)
    spec, space = prepared.spec, prepared.space
    ruled_out = prepared.ruled_out_choices
    # a full fine-tune of 7B needs bf16 weights and gradients at least: over 24 GB
    assert "full" in ruled_out["method"] and "full" not in prepared.fitting_choices["method"]
    assert "8" in {str(c) for c in ruled_out["micro_batch_size"]}
    peaks = {}
    for params in space.all_params():
        peak = estimate(spec, space.build(params, settings.model, spec, 1024)).peak_bytes
        for name, value in params.items():
            peaks.setdefault((name, value), []).append(peak)
    for name, choices in prepared.fitting_choices.items():
        for choice in choices:  # kept: some recipe with it fits
            assert min(peaks[(name, choice)]) <= settings.budget_bytes
    for name, over in ruled_out.items():
        for choice, smallest in over.items():  # dropped: none does, and the figure is the least
            found = [v for (n, c), v in peaks.items() if n == name and str(c) == choice][0]
            assert min(found) == smallest > settings.budget_bytes
    assert budget_fit(BudgetQuery(space, settings.model, spec, 1024, 10**12)).ruled_out == {}

    study = run_study(prepared, FakeRunner())
    assert study.user_attrs["space_choices"] == prepared.fitting_choices
    # the report says what was left out and why, as the run did
    page = render_html(report_data(study))
    smallest = format_bytes(ruled_out["method"]["full"])
    assert "Not searched, no recipe with them fits the budget (predicted): " in page
    assert f"method full ({smallest} at least by the formula)" in page
    for trial in study.trials:
        for name, value in trial.params.items():
            assert value in prepared.fitting_choices[name]
    # bf16 LoRA on q/v starts at the largest micro-batch predicted to fit, not at the largest
    qv = next(t for t in study.trials if t.user_attrs.get("baseline") == "bf16_lora_qv")
    recipe = Recipe.from_dict(qv.user_attrs["recipe"])
    assert qv.user_attrs["predicted_peak_bytes"] <= settings.budget_bytes
    bigger = [m for m in space.choices_of("micro_batch_size") if m > recipe.micro_batch_size]
    for size in bigger:
        larger = recipe.replace(
            micro_batch_size=size, gradient_accumulation_steps=max(8 // size, 1)
        )
        assert estimate(spec, larger).peak_bytes > settings.budget_bytes

    # resumed with another budget, the study keeps the choices it started with
    roomier = prepare_run(dataclasses.replace(settings, budget_bytes=80 * 10**9, trials=14))
    assert "full" in roomier.fitting_choices["method"]
    resumed = run_study(roomier, FakeRunner())
    assert len(resumed.trials) == 14
    assert all(t.params.get("method") != "full" for t in resumed.trials)


def test_weight_cache_reaches_every_probe(workspace):
    runner = FakeRunner()
    run_study(prepare_run(settings_for(workspace, trials=3, weight_cache=True)), runner)
    cache = (workspace[0] / "trials" / "cache").resolve()
    assert runner.requests and all(r.weight_cache == str(cache) for r in runner.requests)
    plain = FakeRunner()
    run_study(prepare_run(settings_for(workspace, trials=2, study_name="plain")), plain)
    assert all(r.weight_cache is None for r in plain.requests)


def test_a_recipe_over_budget_queues_the_nearest_that_fits(qwen2_7b_workspace):
    from autotune.study import REPAIR_DIMENSIONS, nearest_fitting_params

    settings = qwen2_7b_settings(qwen2_7b_workspace, trials=16)
    prepared = prepare_run(settings)
    summaries = []
    study = run_study(prepared, FakeRunner(), RunEvents(trial_finished=summaries.append))
    trials = {t.number: t for t in study.trials}
    shown = {s.number: s.repair_of for s in summaries if s.repair_of is not None}
    assert shown and all(trials[n].user_attrs["repair_of"] == of for n, of in shown.items())
    # (a repair queued by the last trial waits for the next run)
    repairs = [t for t in study.trials if "repair_of" in t.user_attrs and t.state.is_finished()]
    assert repairs
    for repair in repairs:
        original = trials[repair.user_attrs["repair_of"]]
        assert original.user_attrs["status"] == "over_budget_predicted"
        changed = {k for k in original.params if original.params[k] != repair.params.get(k)}
        assert changed and changed <= set(REPAIR_DIMENSIONS)
        assert repair.user_attrs["predicted_peak_bytes"] <= settings.budget_bytes

    # the fewest changes first, then the largest micro-batch
    space = prepared.space
    params = {"micro_batch_size": 8, "gradient_checkpointing": False, "optimizer": "adamw"}

    def fits(p):  # micro-batch 2 fits; 4 only with checkpointing
        return p["micro_batch_size"] <= 2 or (
            p["gradient_checkpointing"] and p["micro_batch_size"] <= 4
        )

    nearest = nearest_fitting_params(space, params, fits)
    assert nearest == {**params, "micro_batch_size": 2}
    assert nearest_fitting_params(space, params, lambda p: False) is None


def test_trials_are_predicted_by_replay(workspace):
    """With the replay memory model each trial's prediction is the replay of its recipe on the
    model's config (the formula only prunes the space), and the trial says which model gave it;
    padded where the data pads its micro-batches, as wide as its longest example."""
    from autotune.replay import load_config, replay

    tmp_path, model, data = workspace
    prepared = prepare_run(settings_for(workspace, trials=5, memory_model="replay"))
    study = run_study(prepared, FakeRunner())
    config = load_config(str(model))
    checked = 0
    for trial in study.trials:
        if trial.user_attrs["status"] == "duplicate":
            continue
        recipe = Recipe.from_dict(trial.user_attrs["recipe"])
        assert trial.user_attrs["memory_model"] == "replay"
        rows = probe_rows(recipe, prepared.train_token_lengths)
        replayed = replay(recipe, config, rows.width, padded=rows.padded).estimate().peak_bytes
        assert trial.user_attrs["predicted_peak_bytes"] == replayed
        checked += 1
    assert checked >= 3


def test_unknown_memory_model_is_refused(workspace):
    with pytest.raises(UsageError, match="--memory-model must be one of replay, formula"):
        prepare_run(settings_for(workspace, memory_model="guess"))


def test_the_end_of_a_run_says_why_nothing_was_measured(workspace):
    from autotune.study import nothing_measured_line

    crashed = run_study(
        prepare_run(settings_for(workspace, trials=2, study_name="crashed")),
        FakeRunner(fail={"": "crash"}),
    )
    assert nothing_measured_line(crashed) == "no recipe ran: 2 trials crashed: fake crash"
    mixed = run_study(
        prepare_run(settings_for(workspace, trials=3, study_name="mixed")),
        FakeRunner(fail={"QLoRA": "timeout", "": "crash"}),
    )
    line = nothing_measured_line(mixed)
    assert line.startswith("no recipe ran: ") and "timed out: fake timeout" in line
    assert "crashed: fake crash" in line
    # a study with measured recipes, none within the budget, keeps the budget's wording
    measured = run_study(
        prepare_run(settings_for(workspace, trials=1, study_name="measured")), FakeRunner()
    )
    assert nothing_measured_line(measured).startswith("no recipe was measured within the budget")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("night-1", "night-1"),
        ("Qwen2.5_7B-train-24GB", "Qwen2.5_7B-train-24GB"),
        ("../../escape", "escape-"),
        ("a/b", "a-b-"),
        ("/etc/passwd", "etc-passwd-"),
        ("x" * 300, "x" * 80 + "-"),
        ("cache", "cache-"),
        ("autotune.db", "autotune.db-"),
        ("a-b-c8687a08", "a-b-c8687a08-"),
    ],
)
def test_study_file_names_stay_in_their_folder(name, expected):
    from autotune.study import study_file_name

    stem = study_file_name(name)
    assert stem.startswith(expected) and "/" not in stem and not stem.startswith(".")
    assert len(stem) <= 89
    if stem != name:
        assert len(stem) == len(expected) + 8  # the hash that keeps a-b and a/b apart
    assert study_file_name("a/b") != study_file_name("a-b")
    assert study_file_name("a b") != study_file_name(study_file_name("a b"))


@pytest.mark.parametrize("name", ["..", "/", "...///", " "])
def test_a_study_name_with_nothing_to_name_files_by_is_refused(workspace, name):
    with pytest.raises(UsageError, match="no letter or digit"):
        prepare_run(settings_for(workspace, study_name=name))


def test_a_hostile_study_name_writes_only_under_trials(workspace):
    tmp_path = workspace[0]
    settings = settings_for(workspace, trials=1, study_name="../../escape")
    run_study(prepare_run(settings), FakeRunner())
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written <= {"trials", "config-only-model", "rows.jsonl", "study.db"}, written
    assert not (tmp_path.parent / "escape").exists()
    [folder] = [p for p in (tmp_path / "trials").iterdir() if p.name.startswith("escape")]
    assert (folder / "trial-0000").is_dir()


def test_the_trials_folder_is_its_owner_s_alone(workspace):
    import stat

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    mode = stat.S_IMODE((workspace[0] / "trials").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_reading_a_study_does_not_load_the_code_that_runs_one():
    import subprocess
    import sys

    code = (
        "import sys, autotune.report, autotune.export, autotune.dashboard\n"
        "print(sorted(m for m in sys.modules if m.startswith('autotune')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    modules = loaded.stdout
    assert "autotune.study.records" in modules and "autotune.study.storage" in modules
    assert "autotune.study.study_records" in modules
    assert "autotune.study.ranking" in modules  # the picks read promoted probes
    running_modules = ("objective", "run", "prepare", "confirm", "workers", "seeding", "promotion")
    for running in (*running_modules, "sampler"):
        assert f"autotune.study.{running}'" not in modules, modules
    assert "autotune.probe'" not in modules and "autotune.replay'" not in modules


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in (ROOT / "autotune" / "study").glob("[!_]*.py"))
)
def test_each_study_module_imports_first_in_a_fresh_process(module):
    # a module imported before the others must not meet a half-made one (the package's lazy
    # names once imported every module to find a submodule, in a cycle)
    import subprocess
    import sys

    started = subprocess.run(
        [sys.executable, "-c", f"import autotune.study.{module}"], capture_output=True, text=True
    )
    assert started.returncode == 0, started.stderr


def test_every_name_of_the_study_package_is_reachable_from_it():
    import ast
    import importlib

    import autotune.study

    package = Path(autotune.study.__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"autotune.study.{path.stem}")
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = (
                [node.name]
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                else [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            )
            for name in names:
                assert getattr(autotune.study, name) is getattr(module, name), name


def test_each_module_of_the_study_package_imports_first():
    """A module imported before the package's others (as conftest imports workers) finds the
    names it takes from its siblings: asking the package for a module is not a name lookup."""
    import subprocess
    import sys

    package = Path(__file__).resolve().parent.parent / "autotune" / "study"
    for path in sorted(package.glob("*.py")):
        code = f"import autotune.study.{path.stem}"
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert loaded.returncode == 0, (path.stem, loaded.stderr)


def test_a_recipe_the_cpu_cannot_run_is_ruled_out_before_any_probe(workspace):
    """DoRA over int8 crashes in bitsandbytes on the CPU (`train` refuses it in one line), yet
    the space cannot leave out either choice alone: a trial that samples both is recorded
    refused with the reason, its probe never started."""
    from autotune.report.table import STATUS_WORDS
    from autotune.study import nothing_measured_line

    space = workspace[0] / "dora.yaml"
    space.write_text(
        "method: lora\nquantization: int8\nprecision: bf16\nlora_r: 4\n"
        "lora_alpha_over_r: 2\nlora_dropout: 0.0\nlora_target_modules: {all-linear: all-linear}\n"
        "use_dora: [true, false]\nmicro_batch_size: 1\neffective_batch_size: 1\n"
        "gradient_checkpointing: false\noptimizer: adamw\nlearning_rate: 1.0e-3\n"
        "expandable_segments: false\nfrozen_layers_fraction: 0.5\n",
        encoding="utf-8",
    )
    prepared = prepare_run(settings_for(workspace, space_path=str(space), trials=2))
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    for params in prepared.space.all_params():
        study.enqueue_trial(params)
    runner = FakeRunner()
    study.optimize(make_objective(prepared, runner, RunEvents()), n_trials=2)
    by_dora = {t.params["use_dora"]: t for t in study.trials}
    refused = by_dora[True]
    assert refused.user_attrs["status"] == "refused"
    assert refused.user_attrs["reason"].startswith(
        "use_dora with quantization int8 on the CPU: bitsandbytes' CPU int8 matmul"
    )
    assert refused.constraints[CONSTRAINT_KEY] > 0  # infeasible, so the sampler learns to avoid it
    assert [r.recipe.use_dora for r in runner.requests] == [False]  # no probe of DoRA
    assert by_dora[False].user_attrs["status"] == "measured"
    assert STATUS_WORDS[refused.user_attrs["status"]] == "refused: cannot train (not run)"
    only = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    only.enqueue_trial(refused.params)
    only.optimize(make_objective(prepared, runner, RunEvents()), n_trials=1)
    assert nothing_measured_line(only) == (
        f"no recipe ran: 1 trial was refused: {refused.user_attrs['reason']}"
    )


def test_the_margin_is_added_to_the_peak_less_the_cuda_context():
    """The margin's errors are of peaks without the CUDA context (bench/memory_bench.py's
    margin_rows), so the context the estimate's breakdown names is added back unmargined."""
    from autotune.memory import MemoryEstimate

    context, rest, margin = 700 * 2**20, 3 * 2**30 + 12345, MemoryMargin(0.163, "a test")
    held = MemoryEstimate(rest + context, {"weights": rest, "cuda_context": context})
    assert margin.estimate_bytes(held) == context + math.ceil(rest * 1.163)
    assert margin.estimate_bytes(held) < math.ceil((rest + context) * 1.163)
    # the context is the breakdown's own, not a constant
    other = MemoryEstimate(rest + 2 * context, {"weights": rest, "cuda_context": 2 * context})
    assert margin.estimate_bytes(other) == margin.estimate_bytes(held) + context


def test_a_recipe_that_fits_once_the_context_is_left_unmargined_is_probed(full_rows_workspace):
    """At a budget between the smallest recipe's peak margined whole (context included) and
    margined less its context, the study fits it and probes it (before, it was ruled out); a
    budget below the latter is still refused."""
    workspace = full_rows_workspace
    tmp_path, model, data = workspace
    prepared = prepare_run(settings_for(workspace, budget_bytes=10**12))

    def margined(params):
        recipe = prepared.space.build(params, str(model), prepared.spec, 64)
        margin = memory_margin("formula", recipe.quantization)
        return margin.estimate_bytes(estimate(prepared.spec, recipe)), params, recipe, margin

    _, params, recipe, margin = min(
        (margined(p) for p in prepared.space.all_params()), key=lambda found: found[0]
    )
    smallest = estimate(prepared.spec, recipe)
    whole = math.ceil(smallest.peak_bytes * (1 + margin.fraction))
    less_context = margin.estimate_bytes(smallest)
    assert smallest.breakdown["cuda_context"] > 0 and less_context < whole
    budget = (whole + less_context) // 2
    settings = settings_for(workspace, budget_bytes=budget, memory_margin=None)
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    study.enqueue_trial(params)
    runner = FakeRunner()
    study.optimize(make_objective(prepare_run(settings), runner, RunEvents()), n_trials=1)
    assert [r.recipe.label() for r in runner.requests] == [recipe.label()]
    with pytest.raises(UsageError, match="by the formula with its margin"):
        prepare_run(settings_for(workspace, budget_bytes=less_context - 1, memory_margin=None))


def test_the_measured_margin_rules_out_what_only_fits_without_it(full_rows_workspace):
    """By default a predicted peak is held to the budget with the memory model's worst measured
    under-prediction added (autotune/memory_margins.json): a recipe that fits only without it
    is ruled out with the margin named; --memory-margin 0 probes it. (Rows as wide as seq_len,
    as the peaks below take them.)"""
    workspace = full_rows_workspace
    tmp_path, model, data = workspace
    prepared = prepare_run(settings_for(workspace, budget_bytes=10**12))
    peaks = {}
    for params in prepared.space.all_params():
        recipe = prepared.space.build(params, str(model), prepared.spec, 64)
        peaks[recipe.label()] = (estimate(prepared.spec, recipe).peak_bytes, recipe.quantization)
    assert memory_margin("formula", "none").fraction > 0.05  # the formula's misses are not small
    smallest = min(peak for peak, _ in peaks.values())
    smallest_margined = min(
        memory_margin("formula", quantization).bytes_of(peak)
        for peak, quantization in peaks.values()
    )
    budget = (smallest + smallest_margined) // 2  # the smallest fits bare, none with its margin
    with pytest.raises(UsageError, match="by the formula with its margin"):
        prepare_run(settings_for(workspace, budget_bytes=budget, memory_margin=None))
    study = run_study(
        prepare_run(settings_for(workspace, budget_bytes=10**12, memory_margin=None, trials=2)),
        FakeRunner(),
    )
    records = [trial_record(t) for t in study.trials]
    assert [r for r in records if r.recipe]
    for record in records:
        if record.recipe:
            quantization = Recipe.from_dict(record.recipe).quantization
            assert record.memory_margin == memory_margin("formula", quantization).fraction
    # a margin of 50% given: the smallest recipe fits with it; a larger one that fits bare
    # but not with the margin is ruled out, and probed at margin 0
    half = MemoryMargin(0.5, "given")
    budget = half.bytes_of(smallest)
    build = prepared.space.build
    held, params = max(
        (
            (estimate(prepared.spec, build(p, str(model), prepared.spec, 64)), p)
            for p in prepared.space.all_params()
        ),
        key=lambda point: point[0].peak_bytes if point[0].peak_bytes <= budget else 0,
    )
    assert smallest < held.peak_bytes <= budget < half.estimate_bytes(held)
    outcomes = {}
    for given in (0.5, 0.0):
        settings = settings_for(workspace, budget_bytes=budget, memory_margin=given)
        study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
        study.enqueue_trial(params)
        runner = FakeRunner()
        study.optimize(make_objective(prepare_run(settings), runner, RunEvents()), n_trials=1)
        outcomes[given] = (study.trials[0].user_attrs, len(runner.requests))
    ruled, probes = outcomes[0.5]
    assert ruled["status"] == "over_budget_predicted" and probes == 0
    assert "+ 50.0% margin > budget" in ruled["reason"]
    assert trial_record(study.trials[0]).memory_margin == 0.0
    probed, probes = outcomes[0.0]
    assert probed["status"] == "measured" and probes == 1


TINY_SPACE = """\
method: [lora]
quantization: [none]
precision: [bf16]
lora_r: [4, 8]
lora_alpha_over_r: 2
lora_dropout: 0.0
lora_target_modules:
  qv: [q_proj, v_proj]
frozen_layers_fraction: [0.5]
micro_batch_size: [1, 2]
effective_batch_size: 4
gradient_checkpointing: [false]
optimizer: [adamw]
expandable_segments: false
learning_rate:
  lora: 1.0e-3
"""


def test_a_run_ends_once_every_recipe_of_its_space_is_tried(workspace):
    """Four recipes (lora_r x micro_batch_size) and --trials 40: the sampler could only repeat
    them after the fourth, so the run ends there, says so, and status does not count it short."""
    from autotune.study.overview import study_overview

    space = workspace[0] / "tiny.yaml"
    space.write_text(TINY_SPACE)
    settings = settings_for(workspace, space_path=space, trials=40, confirm_top=0)
    events = RunEvents()
    study = run_study(prepare_run(settings), FakeRunner(), events)

    def recipes(trials):
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        return {tuple(sorted(t.params.items())) for t in complete}

    assert len(recipes(study.trials)) == 4
    # it stopped at the trial that tried the fourth recipe
    assert len(recipes(study.trials[:-1])) == 3 and len(study.trials) < 40
    said = [n for n in events.notes if n.startswith("every one of the space's 4 recipes")]
    assert len(said) == 1 and "(--trials 40)" in said[0]
    status = study_overview(study, measured_points(study)).finished_words
    assert status.endswith("every one of the space's 4 recipes has been tried"), status

    # a resumed run reads the tried recipes from storage and runs no trial
    count = len(study.trials)
    events = RunEvents()
    again = run_study(prepare_run(settings), FakeRunner(), events)
    assert len(again.trials) == count
    assert any(n.startswith("every one of the space's 4 recipes") for n in events.notes)


def test_the_progress_bar_counts_the_trials_a_run_can_run(workspace, monkeypatch):
    """The bar's total is the most trials the run can add: no more than the space's recipes
    left untried (its total was --trials 40 on a space of four recipes), counted from the
    storage (a resume), and --trials where the space is too large to count. Its last total is
    the count of trials it ran. Status, meanwhile, says the most the study can reach."""
    from rich.console import Console

    import autotune.study.coverage
    from autotune.console import ConsoleReporter
    from autotune.study.objective import TrialSummary
    from autotune.study.overview import study_overview
    from autotune.study.records import finished_trial_count

    space = workspace[0] / "tiny.yaml"
    space.write_text(TINY_SPACE)
    settings = settings_for(workspace, space_path=space, trials=1, confirm_top=0)
    run_study(prepare_run(settings), FakeRunner())  # one of the four recipes tried
    words: list[str] = []

    def bar_totals(trials: int) -> tuple[list[float | None], int]:
        """The bar's total as each trial of the run ended, and the count of its trials."""
        totals: list[float | None] = []
        words.clear()
        with ConsoleReporter(Console(file=io.StringIO(), width=200)) as reporter:
            said = reporter.trial_finished

            def trial_finished(summary: TrialSummary) -> None:
                totals.append(reporter._progress.tasks[0].total)
                said(summary)
                if len(totals) == 1:  # status in the meantime, from the storage
                    study = optuna.load_study(study_name="s", storage=settings.storage)
                    words.append(study_overview(study, []).finished_words)

            reporter.trial_finished = trial_finished
            stored = optuna.load_study(study_name="s", storage=settings.storage).trials
            before = {t.number for t in stored if t.state.is_finished()}
            changed = dataclasses.replace(settings, trials=trials)
            study = run_study(prepare_run(changed), FakeRunner(), reporter)
            bar = reporter._progress.tasks[0]
            ran = [t for t in study.trials if t.state.is_finished() and t.number not in before]
            assert bar.completed == len(ran) and bar.total == bar.completed
        return totals, len(ran)

    totals, ran = bar_totals(40)
    assert totals[0] == 3  # the three untried recipes, not 39
    assert all(total is not None and total < 40 for total in totals) and ran >= 3
    # status counts the same way: "1 of 40 trials finished" before
    assert words == ["1 of at most 4 trials finished (--trials 40; 3 recipes of the space untried)"]

    monkeypatch.setattr(autotune.study.coverage, "SPACE_POINTS_LIMIT", 2)  # not counted
    finished = finished_trial_count(optuna.load_study(study_name="s", storage=settings.storage))
    totals, ran = bar_totals(finished + 2)
    assert totals[0] == 2 and ran == 2  # --trials, less the finished trials


class ShiftingBestLoss(FakeRunner):
    """Four frontier recipes by method: QLoRA the smallest and fastest with the highest eval
    loss, LoRA the balanced one, full fine-tuning the lowest eval loss, slow and large, and
    freeze within the noise (another seed: +0.00015) of it and faster. The smallest is the
    fastest, so the best-loss pick is among the three recipes --confirm 3 chooses."""

    FIGURES = {  # (peak memory, tokens/s, eval loss)
        "qlora": (1e7, 4000.0, 3.010),
        "lora": (2e7, 3000.0, 3.005),
        "freeze": (3e7, 2000.0, 3.0002),
        "full": (4e7, 1000.0, 3.0001),
    }

    def run(self, request, workdir):
        result = super().run(request, workdir)
        recipe = request.recipe
        kind = "qlora" if recipe.quantization != "none" else recipe.method
        memory, speed, loss = self.FIGURES[kind]
        # within a kind only the smallest recipe stays on the frontier
        result.peak_memory_bytes = memory + result.peak_memory_bytes % 10_000_000
        result.tokens_per_second = speed
        result.eval_loss = loss + (0.00015 if request.seed else 0.0)
        return result


def test_the_confirmations_choose_the_best_loss_pick_the_noise_gives(workspace):
    """The noise is measured before the confirmations, so the best-loss recipe they confirm is
    the one export and the report name (the fastest within the noise, not the lowest eval
    loss); a run that finds both recorded chooses the same and confirms nothing more."""
    from autotune.study import confirmations, measured_points, pick_number, quality_ranking

    settings = settings_for(workspace, trials=10, confirm_top=3)
    study = run_study(prepare_run(settings), ShiftingBestLoss())
    confirmed = set(confirmations(study))
    assert study.user_attrs["noise"] and len(confirmed) == 3
    points = measured_points(study)
    ranking = quality_ranking(study, points)
    best_loss = pick_number("best-loss", points, ranking)
    lowest = min(points, key=lambda p: p.eval_loss).number
    assert best_loss != lowest and best_loss in confirmed
    runner = ShiftingBestLoss()
    study = run_study(prepare_run(settings), runner)
    assert set(confirmations(study)) == confirmed and runner.requests == []
