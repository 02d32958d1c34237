"""Whether a study's memory models are told that the data pads the probe's micro-batches."""

from __future__ import annotations

import dataclasses

import pytest

from autotune.errors import UsageError
from autotune.memory import estimate
from autotune.prediction import ProbeRows, pads_micro_batches, predict, probe_rows, replay_key
from autotune.recipe import Recipe
from autotune.study import prepare_run, seeding
from autotune.units import format_bytes
from tests.conftest import write_jsonl
from tests.test_study import settings_for, workspace  # noqa: F401 - the fixture

SHORT_ROWS_SEQ_LEN = 512
"""A seq_len far above the short examples of the sizing tests below."""


def short_rows_prepared(workspace, **changes):  # noqa: F811
    """prepare_run at SHORT_ROWS_SEQ_LEN on examples of about 3 to 40 tokens, lengths that
    differ (padded micro-batches)."""
    tmp_path = workspace[0]
    rows = [{"text": "word " * (2 + i)} for i in range(30)]
    data = write_jsonl(tmp_path / "short.jsonl", rows)
    settings = settings_for(workspace, data_path=data, seq_len=SHORT_ROWS_SEQ_LEN, **changes)
    return prepare_run(settings)


def smallest_peaks(prepared, token_lengths):
    """Each choice's least peak (no margin) of any recipe of the space on the rows data of
    `token_lengths` gives: under a budget of 0 every choice is ruled out with it."""
    from autotune.study import BudgetQuery, budget_fit

    settings = prepared.settings
    fit = budget_fit(
        BudgetQuery(
            prepared.space, settings.model, prepared.spec, settings.seq_len, 0, 0.0, token_lengths
        )
    )
    return fit.ruled_out


def test_the_space_keeps_micro_batches_that_fit_on_the_datas_rows(workspace):  # noqa: F811
    """Examples far shorter than seq_len make padded micro-batches that narrow: the space's
    sizing keeps a micro-batch size that seq_len-wide rows would rule out, and the trials
    predict a recipe of it to fit."""
    roomy = short_rows_prepared(workspace)
    lengths = roomy.train_token_lengths
    assert lengths[0] < lengths[1] < SHORT_ROWS_SEQ_LEN // 8
    largest = max(roomy.space.choices_of("micro_batch_size"))
    seq_len_wide = smallest_peaks(roomy, None)["micro_batch_size"][str(largest)]
    data_wide = smallest_peaks(roomy, lengths)["micro_batch_size"][str(largest)]
    budget = seq_len_wide - 1  # no recipe of the largest micro-batch fits seq_len-wide rows
    assert data_wide <= budget
    prepared = short_rows_prepared(workspace, budget_bytes=budget)
    assert largest in prepared.fitting_choices["micro_batch_size"]
    assert str(largest) not in prepared.ruled_out_choices.get("micro_batch_size", {})
    fits = seeding.fits_budget(prepared)
    assert any(fits(p) for p in prepared.space.all_params() if p["micro_batch_size"] == largest)


def test_a_budget_is_held_to_the_smallest_recipe_on_the_datas_rows(
    workspace,  # noqa: F811
    monkeypatch,
):
    """Below the smallest recipe even on rows one token wide, a budget is refused before the
    data is tokenized; above that, it is held to the smallest recipe on the rows the data
    gives: refused in one line below it, kept at it though seq_len-wide rows need more."""
    import importlib

    from autotune.prediction import NARROWEST_TOKEN_LENGTHS

    roomy = short_rows_prepared(workspace)
    lengths = roomy.train_token_lengths
    narrowest, data_wide, seq_len_wide = (
        min(smallest_peaks(roomy, span)["method"].values())
        for span in (NARROWEST_TOKEN_LENGTHS, lengths, None)
    )
    assert narrowest < data_wide < seq_len_wide
    with pytest.raises(UsageError, match=f"longest training example {lengths[1]} tokens") as error:
        short_rows_prepared(workspace, budget_bytes=data_wide - 1)
    assert "\n" not in str(error.value)
    assert f"below the {format_bytes(data_wide)}" in str(error.value)
    assert short_rows_prepared(workspace, budget_bytes=data_wide).smallest_peak_bytes == data_wide

    prepare = importlib.import_module("autotune.study.prepare")

    def tokenized(*args, **kwargs):
        raise AssertionError("the data was tokenized")

    monkeypatch.setattr(prepare, "cached_splits", tokenized)
    with pytest.raises(UsageError, match="whatever the data's lengths") as error:
        short_rows_prepared(workspace, budget_bytes=narrowest - 1)
    assert "\n" not in str(error.value)
    assert f"below the {format_bytes(narrowest)}" in str(error.value)
    with pytest.raises(AssertionError, match="tokenized"):  # over the early bound: data read
        short_rows_prepared(workspace, budget_bytes=narrowest)


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
        rows = probe_rows(recipe, kwargs["token_lengths"])
        told.append(rows.padded)
        return estimate(spec, recipe, rows.width, rows.padded), "replay", ""

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
    assert replay_key(two_rows, ProbeRows(None, True)) != replay_key(two_rows)
    # rows as wide as the longest example replay apart from seq_len-wide ones, and alike
    assert replay_key(two_rows, ProbeRows(40)) != replay_key(two_rows)
    assert replay_key(two_rows, ProbeRows(64)) == replay_key(two_rows)


def test_train_predicts_the_peak_a_study_predicts_for_the_same_data(
    tiny_model, tmp_path, monkeypatch
):
    """`autotune train` tokenizes its data to learn the longest and shortest example, as a
    study does, and predicts the recipe's peak from them: the study's prediction."""
    import autotune.training.train
    from autotune import api
    from autotune.study.settings import RunSettings

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "lengths.jsonl", [{"text": "word " * (2 + i)} for i in range(30)])
    recipe = Recipe.from_dict(
        {"model": str(tiny_model), "method": "lora", "micro_batch_size": 2, "seq_len": 64}
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
    settings = RunSettings(
        model=str(tiny_model), data_path=data, budget_bytes=10**10, seq_len=64, device="cpu"
    )
    prepared = prepare_run(settings)
    studied, used = seeding.trial_predictor(prepared)(recipe)
    assert used == "replay"
    logged = {}

    def run_training(plan, callbacks):  # checked, tokenized and predicted: no need to train
        logged["predicted_peak_bytes"] = plan.predicted_peak_bytes

    monkeypatch.setattr(autotune.training.train, "run_training", run_training)
    result = api.train(recipe_path, data, tmp_path / "out", device="cpu")
    assert result.predicted.estimate == studied  # breakdown and all
    assert logged["predicted_peak_bytes"] == studied.peak_bytes
    # what train predicted before: seq_len-wide rows without padding
    full_rows = api.memory_prediction(prepared.spec, recipe, prepared.model_config).estimate
    assert full_rows.allocated_bytes > studied.allocated_bytes


def test_padded_rows_replay_as_wide_as_the_longest_example(padded_lora_step):
    """The probe pads each micro-batch to its longest row, and no row is longer than the
    longest training example: data whose examples stop short of seq_len gives narrower rows,
    and the replay told of them allocates what that real step does (seq_len-wide rows, as it
    replayed before, read over)."""
    from autotune.replay import replay
    from autotune.step_trace import REPLAY_TOLERANCE, trace_step

    recipe, config = padded_lora_step
    longest = recipe.seq_len // 2
    traced = trace_step(recipe, padded=True, row_tokens=longest).peak_bytes
    spec = None  # the replay answers; the formula is not asked

    def replayed(token_lengths):
        runs = []

        def run(recipe, config, width, padded):  # as predict replays, without cuBLAS's blocks
            runs.append(replay(recipe, config, width, cublas_workspace_bytes=0, padded=padded))
            return runs[-1]

        assert predict(spec, recipe, config, run=run, token_lengths=token_lengths)[1] == "replay"
        return runs[0].peak_allocated_bytes

    assert probe_rows(recipe, (longest * 3 // 4, longest)) == ProbeRows(longest, True)
    narrow = replayed((longest * 3 // 4, longest))
    assert abs(narrow - traced) <= REPLAY_TOLERANCE * traced
    full_width = replayed((longest * 3 // 4, recipe.seq_len))
    assert full_width > 1.1 * traced
    # packed and padding-free rows are seq_len wide whatever the data
    packed = recipe.replace(batching="packed")
    assert probe_rows(packed, (3, longest)) == ProbeRows(None, False)


def test_the_early_budget_check_sizes_a_few_recipes_and_answers_as_the_whole_space(
    workspace,  # noqa: F811
    monkeypatch,
):
    """Before the data is tokenized a budget is held to the least peak any data gives: that
    needs whether some recipe fits, which a descent from each method's first recipe finds in
    a few predictions, not every recipe of the space sized (the default space's 188,928 took
    seconds); only where none fits is every one predicted. The answer is the whole space's."""
    import importlib

    from autotune.prediction import NARROWEST_TOKEN_LENGTHS
    from autotune.space import SPACES_DIR
    from autotune.study import budget_fit

    prepare = importlib.import_module("autotune.study.prepare")
    pruning = importlib.import_module("autotune.study.pruning")
    predicted: list[int] = []
    sized: list = []  # the early check's query: its space, model, spec and seq_len
    peak_of = pruning.margined_peak_bytes
    monkeypatch.setattr(
        pruning, "margined_peak_bytes", lambda *args: predicted.append(1) or peak_of(*args)
    )
    monkeypatch.setattr(
        prepare,
        "smallest_peak_over_budget",
        lambda query: sized.append(query) or pruning.smallest_peak_over_budget(query),
    )

    def tokenized(*args, **kwargs):
        raise InterruptedError("the data is tokenized next")

    monkeypatch.setattr(prepare, "cached_splits", tokenized)
    with pytest.raises(InterruptedError):
        prepare_run(settings_for(workspace, space_path=SPACES_DIR / "default.yaml"))
    early = sized[0]
    points = sum(1 for _ in early.space.all_params())
    assert points > 10_000 and len(predicted) < points / 100, (len(predicted), points)

    monkeypatch.setattr(pruning, "margined_peak_bytes", peak_of)
    space = early.space.restricted({"micro_batch_size": (1, 8), "batching": ("padded", "packed")})
    query = pruning.BudgetQuery(
        space, early.model, early.spec, early.seq_len, 0, 0.0, NARROWEST_TOKEN_LENGTHS
    )
    least = budget_fit(query).smallest_peak_bytes
    for budget in (least - 1, least, 2 * least):
        over = pruning.smallest_peak_over_budget(dataclasses.replace(query, budget_bytes=budget))
        assert over == ((least, "formula") if budget < least else None)
