"""Successive halving after the search (--promote): which recipes each round probes, for how
long, and that a resumed study does not probe them again."""

from __future__ import annotations

from pathlib import Path

from autotune.study import prepare_run, promoted_quality, promotions, run_study
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
    from autotune.study import measured_points

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
    for number, rounds in recorded.items():
        assert [r.steps for r in rounds] == [6, 12][: len(rounds)]
        assert promoted_quality(study)[number] == rounds[-1].eval_loss
    # a resumed study reuses its rounds
    run_study(prepare_run(settings), runner)
    assert len([r for r in runner.requests if r.steps in (6, 12)]) == len(first) + len(second)


def test_without_promote_nothing_is_probed_again(workspace):  # noqa: F811
    runner = LearnsWithSteps()
    study = run_study(prepare_run(settings_for(workspace, trials=6, confirm_top=0)), runner)
    assert promotions(study) == {} and {r.steps for r in runner.requests} == {3}
