"""The task-metric quality objective (--quality): the metrics by hand, and a tiny-model study
that records exact match as its third objective."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autotune.quality import exact_match, quality_cost, rouge_l
from tests.conftest import write_jsonl
from tests.test_cli import DEMO_SPACE, autotune


def test_exact_match_ignores_whitespace_only():
    assert exact_match("  the  answer\n", "the answer") == 1.0
    assert exact_match("the answer.", "the answer") == 0.0


def test_rouge_l_against_hand_computed_cases():
    # LCS of "the cat sat down" and "the cat lay down" is "the cat down": 3 of 4 each way
    assert rouge_l("the cat sat down", "the cat lay down") == pytest.approx(0.75)
    # LCS 2 ("a c"): precision 2/3, recall 2/2, F1 = 2 * (2/3) / (2/3 + 1) = 0.8
    assert rouge_l("a b c", "A c") == pytest.approx(0.8)
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0


def test_the_objective_stays_a_cost():
    assert quality_cost("eval_loss", 2.5, None) == 2.5
    assert quality_cost("exact_match", 2.5, 0.25) == 0.75


def test_exact_match_is_the_third_objective_of_a_tiny_study(tiny_model, tmp_path):
    words = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest"]
    data = write_jsonl(
        tmp_path / "template.jsonl",
        [{"input": f"Repeat: {w} {n}", "output": f"{w} {n}"} for n in range(5) for w in words],
    )
    storage = f"sqlite:///{tmp_path}/study.db"
    lora_space = tmp_path / "lora.yaml"
    lora_space.write_text(
        Path(DEMO_SPACE).read_text().replace("method: [lora, freeze, full]", "method: [lora]")
    )
    done = autotune(
        *("run", "--model", str(tiny_model), "--data", str(data), "--budget", "4GB"),
        *("--space", str(lora_space), "--trials", "3", "--probe-steps", "2", "--seq-len", "32"),
        *("--storage", storage, "--study", "em", "--device", "cpu", "--confirm", "0"),
        *("--quality", "exact_match", "--promote", "1"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    study = optuna.load_study(study_name="em", storage=storage)
    measured = [t for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert len(measured) >= 2, [t.user_attrs.get("reason") for t in study.trials]
    for trial in measured:
        score = trial.user_attrs["probe_quality_score"]
        assert 0.0 <= score <= 1.0
        assert trial.values[2] == pytest.approx(1.0 - score)
        assert trial.values[2] != pytest.approx(trial.user_attrs["probe_eval_loss"])
    # one promotion round: the better half of the measured recipes, probed for 4 steps
    promoted = {
        int(key.split(":")[1]): rounds
        for key, rounds in study.user_attrs.items()
        if key.startswith("promotion:")
    }
    assert len(promoted) == max(1, len(measured) // 2)
    for rounds in promoted.values():
        assert [(r["round"], r["steps"], r["status"]) for r in rounds] == [(1, 4, "ok")]
        assert 0.0 <= rounds[0]["quality"] <= 1.0  # 1 - the promoted probe's exact match
    page = tmp_path / "em.html"
    shown = autotune("report", "--storage", storage, "--study", "em", "-o", str(page), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "Quality is 1 - exact match of the greedy answers" in page.read_text()


def test_an_unknown_quality_metric_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}] * 10)
    done = autotune(
        *("run", "--model", str(tiny_model), "--data", str(data), "--budget", "4GB"),
        *("--quality", "bleu", "--device", "cpu"),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--quality 'bleu' is not one of eval_loss, exact_match, rouge_l" in done.stderr


def test_a_task_metric_with_several_gpus_per_probe_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "output": "b"}] * 10)
    done = autotune(
        *("run", "--model", str(tiny_model), "--data", str(data), "--budget", "4GB"),
        *("--quality", "rouge_l", "--device", "cpu", "--gpus-per-probe", "2"),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--quality rouge_l scores generations of a one-GPU probe" in done.stderr
