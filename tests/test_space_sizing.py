"""Whether a study leaves a choice out of its space only where the memory model its trials are
held to (the replay) agrees with the formula that sizes the space."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from autotune.errors import UsageError
from autotune.margins import margin_for
from autotune.memory import ALLOCATOR_FIXED_BYTES, MemoryEstimate
from autotune.prediction import predict, replay_rows
from autotune.replay import load_config
from autotune.study import prepare_run, run_study, seeding
from autotune.study.searched_choices import space_choices
from autotune.study.settings import REPLAY_BAND
from autotune.study.unmeasured import not_searched
from autotune.units import format_bytes
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401 - the fixture


def least_full_fine_tune(workspace, monkeypatch, **config_changes):  # noqa: F811
    """The formula's peak (no margin) of the demo space's least full fine-tune by the formula on
    the workspace's data, and the replay's of the same recipe, on the workspace's model with
    `config_changes`; replays run in this process."""
    monkeypatch.setattr(seeding, "replay_in_worker", replay_rows)
    if config_changes:
        config_path = workspace[1] / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, **config_changes}))
    roomy = prepare_run(settings_for(workspace, memory_model="replay"))
    settings, space, spec = roomy.settings, roomy.space, roomy.spec
    lengths = roomy.train_token_lengths
    least = None
    for params in space.all_params():
        if params["method"] == "full":
            recipe = space.build(params, settings.model, spec, settings.seq_len)
            peak = predict(spec, recipe, None, memory_model="formula", token_lengths=lengths)
            if least is None or peak[0].peak_bytes < least[1]:
                least = (recipe, peak[0].peak_bytes)
    assert least is not None
    recipe, formula_peak = least
    replayed, used, _ = predict(spec, recipe, load_config(settings.model), token_lengths=lengths)
    assert used == "replay"
    return formula_peak, replayed.peak_bytes


def test_a_choice_the_replay_fits_stays_in_the_space(workspace, monkeypatch):  # noqa: F811
    """The formula's fixed allocator overhead puts every full fine-tune of the demo model over
    a budget its replay, which trials are held to, fits: the study searches them, where the
    formula alone refuses the budget."""
    formula_peak, replay_peak = least_full_fine_tune(workspace, monkeypatch)
    assert replay_peak < formula_peak
    # over the replay, under the formula, and where trials are replayed (REPLAY_BAND)
    budget = max(replay_peak, math.ceil(formula_peak / REPLAY_BAND))
    assert budget < formula_peak
    told: list[tuple[int, int]] = []
    settings = settings_for(
        workspace,
        memory_model="replay",
        budget_bytes=budget,
        sizing_progress=lambda done, total: told.append((done, total)),
    )
    prepared = prepare_run(settings)
    # one prediction per recipe: the least of each choice ruled out, and the least of all
    assert told[0][0] == 0 and told[-1][0] == told[-1][1] >= 2
    assert "full" in prepared.fitting_choices["method"]
    assert "full" not in prepared.ruled_out_choices.get("method", {})
    assert prepared.smallest_peak_model == "replay"
    assert prepared.smallest_peak_bytes <= budget
    # the replays made are where the trials' predictions start
    assert prepared.replayed and all(used == "replay" for _, used in prepared.replayed.values())
    with pytest.raises(UsageError, match="by the formula with its margin"):
        prepare_run(settings_for(workspace, memory_model="formula", budget_bytes=budget))


def test_a_choice_both_models_put_over_the_budget_leaves(workspace, monkeypatch):  # noqa: F811
    """Below the replay of the least full fine-tune of a model wide enough that its weights
    count, full leaves the space, stored with the replay's figure, which the run and the
    report name as the replay's."""
    formula_peak, replay_peak = least_full_fine_tune(
        workspace, monkeypatch, hidden_size=1024, intermediate_size=4096
    )
    budget = replay_peak - 1
    assert formula_peak <= REPLAY_BAND * budget  # its trials would be replayed
    prepared = prepare_run(settings_for(workspace, memory_model="replay", budget_bytes=budget))
    assert "full" not in prepared.fitting_choices["method"]
    assert prepared.ruled_out_choices["method"]["full"] == replay_peak
    assert prepared.ruled_out_models["method"]["full"] == "replay"
    study = run_study(prepared, FakeRunner())
    stored = space_choices(study)
    assert stored is not None and stored.ruled_out_models["method"]["full"] == "replay"
    words = not_searched(stored.unsupported, stored.ruled_out, stored.ruled_out_models)
    assert f"method full ({format_bytes(replay_peak)} by the replay)" in words[-1]


def test_the_early_check_lets_run_a_choice_that_sizing_keeps():
    """Where the formula puts every recipe over, the early check replayed only the recipe it
    puts least of all; a method whose own least the replay fits (as sizing the space keeps it)
    was refused with the run, before the data was read."""
    from autotune.memory import MemoryEstimate
    from autotune.model_spec import load_model_spec
    from autotune.space import SPACES_DIR, SearchSpace
    from autotune.study.pruning import BudgetQuery, budget_fit, smallest_peak_over_budget
    from tests.conftest import DEMO

    space = SearchSpace.load(SPACES_DIR / "demo.yaml")
    args = (space, str(DEMO / "config.json"), load_model_spec(str(DEMO)), 128)
    formula = budget_fit(BudgetQuery(*args, 0, 0.0))  # every recipe over: each method's least peak
    budget = formula.smallest_peak_bytes - 1
    least_method = min(formula.ruled_out["method"], key=formula.ruled_out["method"].__getitem__)
    other = next(m for m in formula.ruled_out["method"] if m != least_method)

    def held(recipe):  # another method's recipes fit by the replay, the least method's do not
        return MemoryEstimate(1 if recipe.method == other else 2 * budget, {}), "replay"

    query = BudgetQuery(*args, budget, 0.0, held=held)
    assert other in budget_fit(query).choices["method"]
    assert smallest_peak_over_budget(query) is None


def test_a_choice_the_replay_keeps_has_a_repair_and_baseline_that_fit(
    workspace,  # noqa: F811
    monkeypatch,
):
    """Where the replay keeps full fine-tunes in the space and the formula puts every one over
    the budget, a full trial over it was given no recipe to repair it to (the formula found
    none), and the bf16 LoRA baseline kept its largest micro-batch where the formula fit none:
    both are chosen as the trials are held to the budget, the formula ranking, a few replays
    confirming."""
    formula_peak, replay_peak = least_full_fine_tune(workspace, monkeypatch)
    # the least full fine-tune (8-bit AdamW) fits with its margin; with AdamW, 2 MiB more by
    # the replay, it does not: a trial to repair
    budget = margin_for(None, "replay", "none").bytes_of(replay_peak) + 2**20
    assert formula_peak - ALLOCATOR_FIXED_BYTES <= REPLAY_BAND * budget  # replayed
    prepared = prepare_run(settings_for(workspace, memory_model="replay", budget_bytes=budget))
    space = prepared.space
    fits = seeding.fits_budget(prepared)
    replays: list[object] = []
    monkeypatch.setattr(
        seeding, "replay_in_worker", lambda *a, **k: replays.append(a) or replay_rows(*a, **k)
    )
    full = [p for p in space.all_params() if p["method"] == "full"]
    over = next(p for p in full if not fits(p))  # a full trial its prediction rules out
    unreplayed = seeding.fits_budget(dataclasses.replace(prepared, replayed={}))
    replays.clear()
    nearest = seeding.nearest_fitting_params(space, over, unreplayed)
    assert nearest is not None and nearest["method"] == "full" and fits(nearest)
    assert fits.formula_rank(nearest) == 1  # the formula puts it over the budget
    assert 1 <= len(replays) <= seeding.CONFIRMED_CANDIDATES  # the formula's rank spares most
    # the formula alone, as before, finds none
    formula = seeding.fits_budget(dataclasses.replace(prepared, model_config=None))
    assert seeding.nearest_fitting_params(space, over, formula) is None

    # a baseline's largest micro-batch is the largest its trial fits: micro-batch 2 here, where
    # the formula fits none (and the largest, 4, was kept)
    def held(recipe):
        return MemoryEstimate(budget + (recipe.micro_batch_size > 2), {}), "replay"

    bf16_lora = dict(seeding.baseline_params(space))["bf16_lora_qv"]
    assert all(
        fits.formula_rank({**bf16_lora, "micro_batch_size": size}) == 1 for size in (1, 2, 4)
    )
    chosen = dict(seeding.baseline_params(space, seeding.fits_budget(prepared, held)))
    assert chosen["bf16_lora_qv"]["micro_batch_size"] == 2
    assert dict(seeding.baseline_params(space, formula))["bf16_lora_qv"]["micro_batch_size"] == 4


def test_sizing_progress_says_which_recipes_it_counts(monkeypatch, capsys):
    """The count is of the recipes that decide what the budget rules out, not of the space: a
    line reading "1 of 1 recipes" read as a space of one recipe."""
    from autotune import console

    monkeypatch.setattr(console, "SIZING_PROGRESS_SECONDS", 0.0)
    show = console.sizing_progress()
    show(0, 3)
    show(2, 3)
    line = " ".join(capsys.readouterr().err.split())
    assert "2 of the 3 recipes that decide what the budget rules out" in line
    assert "the least of each choice the formula puts over the budget" in line


def test_the_replay_band_leaves_out_the_formula_s_fixed_allocator_reserve(
    workspace,  # noqa: F811
    monkeypatch,
):
    """On a model of a few million parameters the formula's fixed allocator reserve alone puts
    the least full fine-tune over REPLAY_BAND budgets where its replay fits: the band judges
    the formula less that reserve, so the trial is replayed and full is searched."""
    formula_peak, replay_peak = least_full_fine_tune(workspace, monkeypatch)
    budget = max(replay_peak, math.ceil((formula_peak - ALLOCATOR_FIXED_BYTES) / REPLAY_BAND))
    assert formula_peak > REPLAY_BAND * budget  # beyond the band the reserve included
    settings = settings_for(workspace, memory_model="replay", budget_bytes=budget)
    assert seeding.replayed_at(formula_peak, settings, object())
    assert not seeding.replayed_at(formula_peak + ALLOCATOR_FIXED_BYTES, settings, object())
    prepared = prepare_run(settings)
    assert "full" in prepared.fitting_choices["method"]
    assert prepared.smallest_peak_model == "replay"
