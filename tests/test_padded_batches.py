"""Whether a study's memory models are told that the data pads the probe's micro-batches."""

from __future__ import annotations

import pytest

from autotune.memory import estimate
from autotune.prediction import pads_micro_batches, replay_key
from autotune.recipe import Recipe
from autotune.study import prepare_run, seeding
from tests.conftest import write_jsonl
from tests.test_study import settings_for, workspace  # noqa: F401 - the fixture


@pytest.mark.parametrize(
    ("rows", "padded"),
    [
        # lengths from a few tokens up, all below seq_len 64: the longest examples differ
        ([{"text": "word " * (2 + i)} for i in range(30)], True),
        # every example truncated at seq_len: every row as long as the longest
        ([{"text": f"{i} " + "word " * 200} for i in range(30)], False),
    ],
)
def test_the_study_predicts_padded_rows_where_the_data_lengths_differ(
    workspace,  # noqa: F811
    monkeypatch,
    rows,
    padded,
):
    tmp_path, model, _ = workspace
    data = write_jsonl(tmp_path / "lengths.jsonl", rows)
    prepared = prepare_run(settings_for(workspace, data_path=data, memory_model="replay"))
    shortest, longest = prepared.train_token_lengths
    assert (shortest < longest) == padded and longest <= 64
    told = []

    def predict(spec, recipe, config, **kwargs):
        told.append(kwargs["padded"])
        return estimate(spec, recipe, padded=kwargs["padded"]), "replay", ""

    monkeypatch.setattr(seeding, "predict", predict)
    predict_trial = seeding.trial_predictor(prepared)
    two_rows = Recipe.from_dict(
        {"model": str(model), "method": "lora", "micro_batch_size": 2, "seq_len": 64}
    )
    predict_trial(two_rows)
    predict_trial(two_rows.replace(micro_batch_size=1))  # one row: never padded
    predict_trial(two_rows.replace(batching="padding_free"))  # no padding, ever
    assert told == [padded, False, False]
    assert pads_micro_batches(two_rows, None) is False  # nothing known: full rows
    assert replay_key(two_rows, True) != replay_key(two_rows, False)
