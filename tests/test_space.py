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
    ],
)
def test_bad_spaces_are_refused(tmp_path, changes, needle):
    data = {**_default_dict(), **changes}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UsageError, match=needle) as error:
        SearchSpace.load(path)
    assert "\n" not in str(error.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        SearchSpace.load(tmp_path / "none.yaml")


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
    assert "attention" not in demo and SearchSpace.load(SPACES_DIR / "demo.yaml").attention == (
        "sdpa",
    )
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
