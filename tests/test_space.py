from pathlib import Path

import optuna
import pytest
import yaml

from autotune.errors import UsageError
from autotune.model_spec import ModelSpec
from autotune.space import SPACES_DIR, SearchSpace, frozen_layer_count
from autotune.study import baseline_params

SPEC = ModelSpec.from_config_dict(
    {
        "model_type": "qwen2",
        "num_hidden_layers": 8,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    }
)


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_builds_valid_recipes(path):
    space = SearchSpace.load(path)
    points = list(space.all_params())
    assert points
    for params in points[:: max(1, len(points) // 50)]:
        recipe = space.build(params, "m", SPEC, 256)
        recipe.validate()
        assert recipe.effective_batch_size == space.effective_batch_size
        assert space.params_of(recipe, SPEC) == params


def _default_dict():
    return yaml.safe_load((SPACES_DIR / "default.yaml").read_text())


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"rank": [8]}, "unknown keys rank"),
        ({"micro_batch_size": [3]}, "do not divide effective_batch_size"),
        ({"micro_batch_size": [0, 2]}, "integers from 1 to 4096"),
        ({"method": ["lora", "prefix"]}, "method choices"),
        ({"frozen_layers_fraction": [1.5]}, "frozen_layers_fraction"),
        ({"lora_target_modules": {"odd": ["q_proj", "wq"]}}, "lora_target_modules.odd"),
        ({"learning_rate": {"lora": 1e-4}}, "learning_rate.freeze"),
        ({"gradient_checkpointing": [1]}, "gradient_checkpointing"),
        ({"lora_dropout": 2}, "lora_dropout"),
        # a list in a list, or a mapping, is no choice (they crashed as unhashable)
        ({"method": [["lora"]]}, r"method choices must be single values, got \[\['lora'\]\]"),
        ({"optimizer": {"adamw": 1}}, "optimizer choices must be single values"),
        ({"learning_rate": {m: {"a": 1} for m in ("lora", "full", "freeze")}}, "single values"),
        # a learning-rate key that is no method was ignored
        (
            {"learning_rate": {"lora": 1e-4, "full": 1e-5, "freeze": 1e-5, "lroa": 1e-3}},
            r"learning_rate.lroa is not a method \(one of full, lora, freeze\)",
        ),
    ],
)
def test_bad_spaces_are_refused(tmp_path, changes, needle):
    data = {**_default_dict(), **changes}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UsageError, match=needle) as error:
        SearchSpace.load(path)
    assert "\n" not in str(error.value)


def test_missing_space_file_and_bad_yaml(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        SearchSpace.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [lora]\nlora_r:\n  - 4\n - 8\n")
    with pytest.raises(UsageError) as error:
        SearchSpace.load(bad)
    assert str(error.value) == (
        f"{bad}: not valid YAML (line 4 column 2: expected <block end>, "
        "but found '<block sequence start>')"
    )


def test_suggest_is_conditional():
    space = SearchSpace.load()
    study = optuna.create_study(directions=["minimize"] * 3)
    seen_methods = set()
    for _ in range(40):
        trial = study.ask()
        recipe = space.suggest(trial, "m", SPEC, 512)
        seen_methods.add(recipe.method)
        if recipe.method != "lora":
            assert "lora_r" not in trial.params and "quantization" not in trial.params
            assert recipe.quantization == "none"
        if recipe.method == "freeze":
            assert 1 <= recipe.frozen_layers < SPEC.num_layers
        study.tell(trial, [1.0, 1.0, 1.0])
    assert seen_methods == {"lora", "freeze", "full"}


def test_frozen_layer_count_keeps_one_block_each_side():
    assert frozen_layer_count(SPEC, 0.01) == 1
    assert frozen_layer_count(SPEC, 0.99) == 7
    assert frozen_layer_count(SPEC, 0.5) == 4


def test_baselines_are_points_of_the_space():
    for path in SPACES_DIR.glob("*.yaml"):
        space = SearchSpace.load(path)
        for _, params in baseline_params(space):
            recipe = space.build(params, "m", SPEC, 128)
            assert space.params_of(recipe, SPEC) == params
    default = baseline_params(SearchSpace.load())
    assert default[0][0] == "qlora_default"
    qlora = space_recipe = SearchSpace.load().build(default[0][1], "m", SPEC, 128)
    assert (qlora.quantization, qlora.lora_r, qlora.micro_batch_size) == ("nf4", 16, 1)
    assert space_recipe.lora_target_modules == "all-linear"


def test_default_space_path_exists():
    assert Path(SPACES_DIR / "default.yaml").is_file()


def test_attention_is_optional_and_checked(tmp_path):
    demo = yaml.safe_load((SPACES_DIR / "demo.yaml").read_text())
    demo_space = SearchSpace.load(SPACES_DIR / "demo.yaml")
    assert "attention" not in demo and demo_space.choices_of("attention") == ("sdpa",)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**demo, "attention": ["sdpa", "eager"]}))
    space = SearchSpace.load(path)
    assert {space.build({**p}, "m", SPEC, 64).attention for p in space.all_params()} == {
        "sdpa",
        "eager",
    }
    path.write_text(yaml.safe_dump({**demo, "attention": ["xformers"]}))
    with pytest.raises(UsageError, match="attention choices"):
        SearchSpace.load(path)


def _space_with(tmp_path, **changes):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**_default_dict(), **changes}))
    return SearchSpace.load(path)


def test_one_value_is_fixed_and_several_are_searched(tmp_path):
    """lora_dropout and learning_rate are trial parameters only where a space lists several
    values; a learning rate given per method is searched per method."""
    fixed = SearchSpace.load()
    assert not {"lora_dropout", "lora_learning_rate", "learning_rate"} & set(fixed.choices())
    space = _space_with(
        tmp_path,
        lora_dropout=[0.0, 0.1],
        learning_rate={"lora": [1.0e-4, 3.0e-4], "freeze": 2.0e-5, "full": 1.0e-5},
    )
    choices = space.choices()
    assert choices["lora_dropout"] == [0.0, 0.1]
    assert choices["lora_learning_rate"] == [1.0e-4, 3.0e-4]
    assert "freeze_learning_rate" not in choices and "full_learning_rate" not in choices
    lora_points = [p for p in space.all_params() if p["method"] == "lora"]
    fixed_lora_points = [p for p in fixed.all_params() if p["method"] == "lora"]
    assert len(lora_points) == 4 * len(fixed_lora_points)
    assert {(p["lora_dropout"], p["lora_learning_rate"]) for p in lora_points} == {
        (d, r) for d in (0.0, 0.1) for r in (1.0e-4, 3.0e-4)
    }
    for params in lora_points[:: max(1, len(lora_points) // 40)] + lora_points[-3:]:
        recipe = space.build(params, "m", SPEC, 128)
        assert (recipe.lora_dropout, recipe.learning_rate) == (
            params["lora_dropout"],
            params["lora_learning_rate"],
        )
        assert space.params_of(recipe, SPEC) == params
    full = space.build({**fixed.params_like({"method": "full"})}, "m", SPEC, 128)
    assert full.learning_rate == 1.0e-5 and full.lora_dropout is None

    study = optuna.create_study(directions=["minimize"] * 3)
    sampled = set()
    for _ in range(40):
        trial = study.ask()
        recipe = space.suggest(trial, "m", SPEC, 128)
        if recipe.method == "lora":
            assert trial.params["lora_dropout"] == recipe.lora_dropout
            sampled.add(recipe.learning_rate)
        else:
            assert "lora_dropout" not in trial.params
            assert "lora_learning_rate" not in trial.params
        study.tell(trial, [1.0, 1.0, 1.0])
    assert sampled == {1.0e-4, 3.0e-4}
    for _, params in baseline_params(space):
        assert space.params_of(space.build(params, "m", SPEC, 128), SPEC) == params


def test_a_learning_rate_list_is_searched_for_every_method(tmp_path):
    space = _space_with(tmp_path, learning_rate=[1.0e-5, 1.0e-4])
    assert {n: c for n, c in space.choices().items() if n.endswith("learning_rate")} == {
        f"{m}_learning_rate": [1.0e-5, 1.0e-4] for m in ("lora", "freeze", "full")
    }


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"lora_dropout": [0.1, 1.5]}, r"lora_dropout choices must be numbers in \[0, 1\)"),
        ({"lora_dropout": [0.1, 0.1]}, "lora_dropout lists a choice twice"),
        (
            {"learning_rate": {"lora": [1.0e-4, "1e-4"], "freeze": 1.0, "full": 1.0}},
            "learning_rate.lora",
        ),
        ({"learning_rate": [1.0e-4, -1.0]}, "learning_rate.lora choices must be positive"),
    ],
)
def test_bad_searched_values_are_refused(tmp_path, changes, needle):
    with pytest.raises(UsageError, match=needle):
        _space_with(tmp_path, **changes)
