"""--gpus-per-probe as counts to search: num_gpus a dimension of the study, one GPU being
distributed none, the effective batch fixed over every count."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from autotune.distributed import parse_gpu_counts
from autotune.errors import UsageError
from autotune.model_spec import load_model_spec
from autotune.space import SearchSpace
from autotune.study.pruning import distributed_space
from tests.conftest import ROOT, SHAPE_CONFIGS

DEMO_SPACE = ROOT / "autotune" / "search_spaces" / "demo.yaml"


@pytest.mark.parametrize(
    "text, counts",
    [("2", (2,)), ("1,2,4", (1, 2, 4)), ("1-4", (1, 2, 3, 4)), ("4,1-2, 2", (1, 2, 4))],
)
def test_counts_are_a_count_a_list_or_a_range(text, counts):
    assert parse_gpu_counts(text) == counts


@pytest.mark.parametrize("text", ["0", "", "two", "4-1", "1-", "0-2", "2,,4", "-1", "2000"])
def test_bad_counts_are_refused_in_one_line(text):
    with pytest.raises(UsageError, match="takes a count .2., a list .1,2,4. or a range"):
        parse_gpu_counts(text)


def test_more_gpus_per_probe_than_gpus_given_is_refused(tmp_path):
    from autotune.study.settings import RunSettings, check_workers, gpu_groups

    def settings(**changes):
        return RunSettings(model="m", data_path=tmp_path, budget_bytes=1, **changes)

    with pytest.raises(UsageError, match="--gpus-per-probe 4 is more than the 2 GPUs of --gpus"):
        check_workers(settings(gpus=("0", "1"), gpus_per_probe=(1, 4)), "cuda")
    with pytest.raises(UsageError, match="largest count must divide the 3 GPUs"):
        check_workers(settings(gpus=("0", "1", "2"), gpus_per_probe=(1, 2)), "cuda")
    # groups of the largest count: a 1-GPU probe runs on the first GPU of its group
    four = settings(gpus=("0", "1", "2", "3"), gpus_per_probe=(1, 2))
    assert gpu_groups(four, "cuda") == ["0,1", "2,3"]
    assert settings(gpus_per_probe=2).gpus_per_probe == (2,)  # one count, as before


def test_a_range_searches_num_gpus_with_the_effective_batch_fixed():
    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-0.5b.json"))
    unsupported: dict[str, dict[str, str]] = {}
    space = distributed_space(SearchSpace.load(DEMO_SPACE), (1, 2, 4), unsupported)
    # every strategy where the space names none; DeepSpeed's where it is installed
    zero = ("deepspeed_zero2", "deepspeed_zero3") if importlib.util.find_spec("deepspeed") else ()
    assert space.choices_of("distributed") == ("none", "ddp", "fsdp", *zero)
    assert space.choices_of("num_gpus") == (2, 4) and space.searched("num_gpus")
    assert "x 4 GPUs does not divide" in unsupported["micro_batch_size"]["2"]
    points = list(space.all_params())
    assert len(points) == len({tuple(sorted(p.items())) for p in points})
    single = [p for p in points if p["distributed"] == "none"]
    assert single and all("num_gpus" not in p for p in single)  # no rank count on one GPU
    seen = set()
    for params in points:
        recipe = space.build(params, "m", spec, 256)
        assert recipe.effective_batch_size == space.effective_batch_size
        assert (recipe.num_gpus == 1) == (recipe.distributed == "none")
        assert space.params_of(recipe, spec) == params
        seen.add((recipe.distributed, recipe.num_gpus))
    several = {(strategy, gpus) for strategy in ("ddp", "fsdp", *zero) for gpus in (2, 4)}
    assert seen == {("none", 1)} | several


def test_a_cpu_study_with_a_range_probes_one_and_two_rank_recipes(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    from autotune.probe import SubprocessProbeRunner
    from autotune.study import RunSettings, prepare_run, run_study, trial_record
    from autotune.study.records import trial_status
    from tests.test_multi_gpu import full_fp32_cpu_study

    monkeypatch.chdir(tmp_path)
    settings = full_fp32_cpu_study(tiny_model, qa_data, tmp_path, ["none", "ddp"], (1, 2), "1-2")
    space = yaml.safe_load(settings.space_path.read_text())
    study = run_study(prepare_run(settings), SubprocessProbeRunner(300, warm=False))
    recipes = {}
    for trial in study.trials:
        assert str(trial_status(trial)) == "measured", trial.user_attrs.get("reason")
        recipe = trial_record(trial).recipe
        recipes[recipe.get("distributed", "none")] = recipe
    assert set(recipes) == {"none", "ddp"}
    assert recipes["ddp"]["num_gpus"] == 2 and "num_gpus" not in recipes["none"]
    batch = space["effective_batch_size"]
    assert recipes["none"]["gradient_accumulation_steps"] == batch
    assert recipes["ddp"]["gradient_accumulation_steps"] * 2 == batch
    with pytest.raises(UsageError, match="--gpus-per-probe was 1,2, now 2"):
        run_study(prepare_run(RunSettings(**{**settings.__dict__, "gpus_per_probe": (2,)})), None)
