"""Rank correlation, noise groups and successive halving (autotune.fidelity), against cases
worked out by hand."""

from __future__ import annotations

import html
import math

import pytest

from autotune.fidelity import (
    FIDELITY_READING,
    fidelity_reading,
    ladder_groups,
    ladder_order,
    noise_groups_line,
    ranks,
    spearman_rho,
    successive_halving,
)
from tests.conftest import load_bench
from tests.test_study import NoisyRunner, settings_for, workspace  # noqa: F401


def test_ranks_share_the_mean_rank_on_ties():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_spearman_rho_against_hand_computed_cases():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped neighbour pair among 4: 1 - 6 * (1 + 1) / (4 * (16 - 1)) = 0.8
    assert spearman_rho([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    # ties: ranks x = (1.5, 1.5, 3), y = (1, 2, 3), both of mean 2; deviations (-.5, -.5, 1)
    # and (-1, 0, 1): covariance 1.5, spreads sqrt(1.5) and sqrt(2)
    assert spearman_rho([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert math.isnan(spearman_rho([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman_rho([1], [1])


def test_recipes_within_the_noise_form_one_group():
    # one probe length each: grouped by eval loss alone
    ladders = {7: [1.50], 3: [1.52], 9: [1.60], 4: [1.61], 1: [2.0]}
    assert ladder_groups(ladders, noise=0.03) == [[7, 3], [9, 4], [1]]
    assert ladder_groups(ladders, noise=0.0) == [[7], [3], [9], [4], [1]]
    assert ladder_groups(ladders, noise=1.0) == [[7, 3, 9, 4, 1]]


def test_successive_halving_keeps_the_better_half():
    assert successive_halving({"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}) == ["b", "c"]
    assert successive_halving({"a": 3.0, "b": 1.0, "c": 2.0}) == ["b"]
    assert successive_halving({"a": 1.0}) == ["a"]


def test_the_noise_groups_reading_names_the_groups_only():
    line = noise_groups_line({7: [1.50], 3: [1.52], 9: [1.60], 1: [2.0]}, noise=0.03)
    assert line is not None and line.endswith("so not ranked: trials 7, 3.")
    assert "0.030" in line and "longest probe" not in line
    assert noise_groups_line({7: [1.5], 9: [1.6]}, noise=0.03) is None


def test_promoted_recipes_are_ranked_at_the_longest_probe_both_reached():
    # base probe, then promotion rounds: 5 and 2 reached round 2, 8 round 1 only, 6 none
    ladders = {6: [1.40], 8: [1.20, 1.15], 5: [1.10, 1.00, 0.90], 2: [1.05, 1.02, 0.80]}
    # at the base length 2 leads 5; at round 2 (the longest both reached) 5 trails 2 by 0.10
    assert ladder_order(ladders) == [2, 5, 8, 6]
    # neighbours: 2-5 at round 2 (0.10 apart), 5-8 at round 1 (1.15 - 1.00 = 0.15), 8-6 at the
    # base length (1.40 - 1.20 = 0.20)
    assert ladder_groups(ladders, noise=0.12) == [[2, 5], [8], [6]]
    assert ladder_groups(ladders, noise=0.16) == [[2, 5, 8], [6]]
    assert ladder_groups(ladders, noise=0.05) == [[2], [5], [8], [6]]
    line = noise_groups_line(ladders, noise=0.12)
    assert line is not None and "compared at the longest probe both reached" in line
    assert line.endswith("so not ranked: trials 2, 5.")


def test_the_report_groups_frontier_recipes_within_the_noise(workspace):  # noqa: F811
    from autotune.report import report_data
    from autotune.report.page import render_html
    from autotune.study import prepare_run, run_study

    class SameLoss(NoisyRunner):
        """Every recipe's eval loss 3.0 (0.02 more with another seed): all inside the noise."""

        def run(self, request, workdir):
            result = super().run(request, workdir)
            if result.eval_loss is not None:
                result.eval_loss = 3.0 + (0.02 if request.seed else 0.0)
            return result

    study = run_study(prepare_run(settings_for(workspace, trials=8, confirm_top=1)), SameLoss())
    data = report_data(study)
    [reading] = [line for line in data.quality_notes if line.startswith(FIDELITY_READING)]
    # the study's 3-step probes are shorter than any the benchmark measured: it says so
    assert reading.endswith(
        "This study's probes ran 3 steps, shorter than any the benchmark measured (20 at the "
        "least): how far their ranking holds was not measured."
    )
    assert fidelity_reading(80) == FIDELITY_READING + " This study's probes ran 80 steps."
    [grouped] = [line for line in data.quality_notes if line.startswith("Indistinguishable")]
    frame = data.frame
    front = sorted(int(t) for t in frame.loc[frame["on_frontier"], "trial"])
    assert len(front) > 1 and grouped.endswith(f"trials {', '.join(map(str, front))}.")
    page = render_html(data)  # stated under the frontier table, before the charts
    assert page.index("frontier-table") < page.index(grouped) < page.index("<h2>Charts")
    assert page.index(html.escape(reading)) < page.index("<h2>Charts")


def test_halving_against_plain_probes_of_the_same_probe_steps_by_hand():
    summary = load_bench("fidelity_summary")
    # four recipes whose long runs rank a < b < c < d; at 10 steps a starts slowest
    longs = {name: {"status": "ok", "eval_loss": loss} for name, loss in zip("abcd", (1, 2, 3, 4))}
    at_10 = {"a": 5.0, "b": 4.0, "c": 4.1, "d": 4.5}
    at_20 = {"a": 3.0, "b": 3.5, "c": 3.4, "d": 3.9}
    probes = {
        f"{name}/{steps}/0": {"status": "ok", "eval_loss": losses[name]}
        for steps, losses in ((10, at_10), (20, at_20))
        for name in "abcd"
    }
    [entry] = summary.halving_at_equal_steps(probes, longs, list("abcd"), [10, 20], seeds=1)
    # halving: b and c (the better half at 10 steps) again at 20, where c leads; then d, a by
    # their 10-step loss: ranks a 4, b 2, c 1, d 3 against 1, 2, 3, 4, squared differences
    # 9 + 0 + 4 + 1 = 14, rho = 1 - 6 * 14 / (4 * 15) = -0.4, in 4 * 10 + 2 * 20 = 80 steps
    # plain 20-step probes: ranks a 1, c 2, b 3, d 4: 1 - 6 * 2 / 60 = 0.8, in 4 * 20 = 80 steps
    assert entry["halving_probe_steps"] == entry["plain_probe_steps"] == 80
    assert entry["rho_halving"] == [pytest.approx(-0.4)]
    assert entry["rho_plain"] == [pytest.approx(0.8)]
    assert (entry["halving"], entry["recipes"]) == ("10 -> 20", 4)


def test_the_fidelity_reading_states_what_the_committed_bench_measured():
    import json
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    names = ("fidelity_cpu.json", "fidelity_cpu_summary.json", "fidelity_cpu_bigger.json")
    summaries = [json.loads((results / n).read_text(encoding="utf-8"))["summary"] for n in names]
    words = {10: "ten", 11: "eleven", 12: "twelve"}
    assert {s["recipes_with_long_run"] for s in summaries} == {11}
    assert f"ranked {words[11]} recipes" in FIDELITY_READING
    patterns = {
        "80": r"80-step probes .*? rho ([0-9., and]+)",
        "40": r"40-step probes: ([0-9., and]+)",
    }
    for steps, pattern in patterns.items():
        sentence = re.search(pattern, FIDELITY_READING)
        stated = [float(x) for x in re.findall(r"\d\.\d+", sentence.group(1))]
        measured = [s["rho"][steps]["seed_mean"] for s in summaries]
        assert stated == pytest.approx(measured, abs=0.005)
    low, high = map(float, re.search(r"by (\d\.\d+) to (\d\.\d+)", FIDELITY_READING).groups())
    noise = sorted(s["median_seed_stdev"] for s in summaries)
    assert (low, high) == pytest.approx((noise[0], noise[-1]), abs=0.0005)
