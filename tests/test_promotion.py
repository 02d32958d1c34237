"""Successive halving after the search (--promote): which recipes each round probes, for how
long, and that a resumed study does not probe them again."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from autotune.study import prepare_run, promotions, run_study
from autotune.training.io import ProbeRequest, ProbeResult
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401


class LearnsWithSteps(FakeRunner):
    """Longer probes reach a lower eval loss, by the same amount for every recipe."""

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        result = super().run(request, workdir)
        if result.eval_loss is not None:
            result.eval_loss -= 0.001 * request.steps
        return result


def test_promotion_rounds_probe_the_better_half_for_twice_the_steps(workspace):  # noqa: F811
    runner = LearnsWithSteps()
    settings = settings_for(workspace, trials=8, confirm_top=0, promote_rounds=2)
    study = run_study(prepare_run(settings), runner)
    from autotune.study import measured_points, quality_ranking

    points = measured_points(study)
    assert len(points) >= 4
    first = [r for r in runner.requests if r.steps == 6]
    second = [r for r in runner.requests if r.steps == 12]
    assert len(first) == len(points) // 2 and len(second) == len(points) // 4
    # round 1 takes the lowest eval losses of the search; round 2 the lowest of round 1
    best = sorted(points, key=lambda p: p.eval_loss)[: len(points) // 2]
    recorded = promotions(study)
    assert set(recorded) == {p.number for p in best}
    reached_two = {n for n, rounds in recorded.items() if len(rounds) == 2}
    assert len(reached_two) == len(points) // 4
    ranking = quality_ranking(study, points)
    for number, rounds in recorded.items():
        assert [r.steps for r in rounds] == [6, 12][: len(rounds)]
        assert ranking.longest(number) == (rounds[-1].steps, rounds[-1].eval_loss)
    # a resumed study reuses its rounds
    run_study(prepare_run(settings), runner)
    assert len([r for r in runner.requests if r.steps in (6, 12)]) == len(first) + len(second)
    # every promoted probe let its claim go once recorded: the storage keeps no claim studies
    from autotune.study.claims import is_claim_study

    names = [s.study_name for s in optuna.get_all_study_summaries(study._storage)]
    assert not [name for name in names if is_claim_study(name)]


def test_without_promote_nothing_is_probed_again(workspace):  # noqa: F811
    runner = LearnsWithSteps()
    study = run_study(prepare_run(settings_for(workspace, trials=6, confirm_top=0)), runner)
    assert promotions(study) == {} and {r.steps for r in runner.requests} == {3}


class SlowStartersWin(FakeRunner):
    """At the study's probe length the larger LoRA rank leads; on a longer probe the order
    turns over (a smaller rank ends lower), as recipes that start slowly do."""

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        result = super().run(request, workdir)
        if result.eval_loss is not None and request.steps > 3:
            result.eval_loss = 2.0 + 0.01 * (request.recipe.lora_r or 10) + 0.001 * request.steps
        return result


def test_the_best_loss_pick_and_the_report_follow_the_longer_probes(workspace):  # noqa: F811
    from autotune.pareto import frontier, pick
    from autotune.report import render_html, report_data
    from autotune.study import measured_points, pick_number, quality_ranking

    settings = settings_for(workspace, trials=10, confirm_top=0, promote_rounds=1)
    study = run_study(prepare_run(settings), SlowStartersWin())
    points = measured_points(study)
    front = {p.number for p in frontier(points)}
    # each promoted trial's eval loss on its longest probe, as recorded (one round here)
    longer = {number: rounds[-1].eval_loss for number, rounds in promotions(study).items()}
    promoted_front = [n for n in longer if n in front]
    assert len(promoted_front) >= 2
    # the frontier's third objective stays the 3-step probe of every trial
    assert {p.number: p.eval_loss for p in points} == {
        t.number: t.values[2] for t in study.trials if t.number in {p.number for p in points}
    }
    by_base = pick(points, "best-loss").number
    by_longer = min(promoted_front, key=lambda n: (longer[n], n))
    assert by_base != by_longer  # the case turns the order over
    ranking = quality_ranking(study, points)
    assert pick_number("best-loss", points, ranking) == by_longer
    # every place a pick is read: export, `autotune studies`, the report's readings
    from autotune.export import picked_trial
    from autotune.study.overview import study_overview

    assert picked_trial(study, "best-loss", points, ranking).number == by_longer
    from autotune.export import recipe_yaml

    measured = yaml.safe_load(recipe_yaml(study, "best-loss")[1])["measured"]
    assert measured["longer_probe"] == {"steps": 6, "eval_loss": round(longer[by_longer], 5)}
    assert study_overview(study, points).picks["best-loss"].trial == by_longer
    assert ranking.steps == (3, 6) and ranking.longest(by_longer) == (6, longer[by_longer])

    data = report_data(study)
    [best] = [line for line in data.readings if line.startswith("best eval loss")]
    assert f"(trial {by_longer})" in best
    [card] = [c for c in data.cards if "best-loss" in c.picks]
    assert card.trial == by_longer and card.longer_probe == (6, longer[by_longer])
    [line] = [n for n in data.quality_notes if n.startswith("Quality ranking")]
    promoted_words = ", ".join(map(str, sorted(promoted_front)))
    assert f"trials {promoted_words} at 6 steps (promoted probe)" in line
    assert "3-step probe of every trial" in line
    page = render_html(data)
    assert page.count("Longer probe eval loss (6 steps)") == 2  # frontier and trial tables
    assert f"{longer[by_longer]:.4f} on a longer probe (6 steps)" in page
    assert page.index("frontier-table") < page.index("Quality ranking") < page.index("Charts")


def test_a_card_compares_with_the_default_at_the_longest_probe_both_reached():
    import pandas as pd

    from autotune.report.card import _card
    from autotune.study.ranking import QualityRanking
    from autotune.study.study_records import Noise

    rows = pd.DataFrame(
        {
            "trial": [0, 1],
            "recipe": ["QLoRA", "full"],
            "peak_memory_bytes": [1e9, 2e9],
            "tokens_per_second": [1000.0, 2000.0],
            "eval_loss": [2.92, 2.90],
            "held_up": [None, None],
            "baseline": ["qlora_default", ""],
        }
    ).set_index("trial", drop=False)
    # the default (trial 0) reached round 1, trial 1 round 2: they compare at round 1, 6 steps
    ranking = QualityRanking({0: [2.92, 2.20], 1: [2.90, 2.10, 2.05]}, (3, 6, 12))
    noise = Noise(0, 1, 3, 2.93, 0.05, None, None)  # another seed moved eval loss by 0.05
    card = _card(rows.loc[1], 1, ("best-loss",), rows.loc[0], noise, None, ranking)
    assert card.longer_probe == (12, 2.05) and card.change_at_steps == 6
    assert card.eval_loss_change == pytest.approx(2.10 - 2.20) and card.loss_beyond_noise
    # not promoted together: the study's probe, as without --promote
    alone = QualityRanking({0: [2.92], 1: [2.90, 2.10]}, (3, 6))
    card = _card(rows.loc[1], 1, ("best-loss",), rows.loc[0], noise, None, alone)
    assert card.change_at_steps is None and card.eval_loss_change == pytest.approx(-0.02)
    assert card.loss_beyond_noise is False


def test_each_promoted_probe_is_shown_as_it_ends(workspace):  # noqa: F811
    """Promotion rounds (each probe 2x, 4x, ... the steps) ran with nothing on the screen
    until the last one ended."""
    from rich.console import Console

    from autotune.console import ConsoleReporter

    console = Console(record=True, width=200)
    settings = settings_for(workspace, trials=6, confirm_top=0, promote_rounds=1)
    with ConsoleReporter(console) as reporter:
        study = run_study(prepare_run(settings), LearnsWithSteps(), reporter)
    shown = console.export_text()
    recorded = promotions(study)
    assert recorded
    for number, [promoted] in recorded.items():
        assert (
            f"promote trial {number} (round 1, 6 steps): eval loss {promoted.eval_loss:.4f}"
            in shown
        )
