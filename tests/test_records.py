"""What a study stores reads back through its one reader, in the form earlier versions wrote."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from autotune.recipe import Recipe
from autotune.study.claims import Claim, claim_of, record_claim
from autotune.study.records import (
    record_prediction,
    record_probe_result,
    trial_record,
)
from autotune.study.searched_choices import SpaceChoices, record_space_choices, space_choices
from autotune.study.study_records import (
    Confirmation,
    Noise,
    StudySetup,
    confirmations,
    holds_up,
    record_confirmation,
    record_noise,
    record_setup,
    study_noise,
    study_setup,
)
from autotune.training.io import ProbeResult


@pytest.fixture
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=["minimize", "maximize", "minimize"])


# As the study stored them before the typed records, key for key.
STORED_CONFIRMATION = {
    "status": "ok",
    "reason": "",
    "steps": 20,
    "seed": 1,
    "peak_memory_bytes": 123,
    "tokens_per_second": 900.0,
    "eval_loss": 2.5,
    "speed_change": -0.1,
    "held_up": True,
    "over_budget": False,
    "in_place_of": 7,
    "pick": "balanced",
}
STORED_NOISE = {
    "trial": 3,
    "seed": 1,
    "steps": 10,
    "eval_loss": 2.52,
    "eval_loss_difference": 0.02,
    "tokens_per_second_change": 0.03,
    "peak_memory_change": None,
}


def test_confirmations_and_noise_stored_as_dicts_read_back(study):
    study.set_user_attr("confirmation:3", STORED_CONFIRMATION)
    study.set_user_attr("noise", {**STORED_NOISE, "written_by": "a later version"})
    assert confirmations(study) == {3: Confirmation(**STORED_CONFIRMATION)}
    assert study_noise(study) == Noise(**STORED_NOISE)


def test_each_writer_stores_the_form_its_reader_reads(study):
    record_confirmation(study, 5, Confirmation(**STORED_CONFIRMATION))
    record_noise(study, Noise(**STORED_NOISE))
    assert study.user_attrs["confirmation:5"] == STORED_CONFIRMATION
    assert study.user_attrs["noise"] == STORED_NOISE
    assert confirmations(study)[5].held_up is True and study_noise(study).trial == 3
    storage = study._storage
    claim_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s#claim:noise")
    assert claim_of(storage, claim_id) is None  # created, its holder not yet written
    record_claim(storage, claim_id, Claim("host:1", 10.0))
    assert storage.get_study_user_attrs(claim_id)["claim"] == {"worker": "host:1", "at": 10.0}
    assert claim_of(storage, claim_id) == Claim("host:1", 10.0)
    record_space_choices(study, SpaceChoices({"lora_r": [8, 16]}, {"method": {"full": 9}}))
    assert study.user_attrs["space_choices"] == {"lora_r": [8, 16]}
    assert "unsupported_choices" not in study.user_attrs
    assert space_choices(study) == SpaceChoices({"lora_r": [8, 16]}, {"method": {"full": 9}})


def test_a_study_from_before_measured_under_compares_what_it_stored(study):
    assert study_noise(study) is None and space_choices(study) is None
    for key, value in {"model": "m", "budget_bytes": 5, "seq_len": 64, "probe_steps": 4}.items():
        study.set_user_attr(key, value)
    setup = study_setup(study)
    assert setup.budget_bytes == 5 and setup.model == "m"
    assert setup.measured_under == {"seq_len": 64, "probe_steps": 4}
    record_setup(study, StudySetup(model="m", seq_len=64, measured_under={"device": "cpu"}))
    assert study.user_attrs["seq_len"] == 64
    assert study_setup(study).measured_under == {"device": "cpu"}


def test_a_trial_s_probe_figures_read_back_from_their_flat_attributes(study):
    trial = study.ask()
    recipe = Recipe(model="demo")
    record_prediction(trial, recipe, 1000, {"weights": 600}, "replay")
    result = ProbeResult(
        status="ok", device="cpu", peak_memory_bytes=2000, steps_done=4, seconds={"total": 1.23456}
    )
    record_probe_result(trial, result)
    attrs = study.trials[0].user_attrs
    # The flat form earlier versions wrote: probe_<field>, probe_seconds_<phase>.
    assert attrs["probe_peak_memory_bytes"] == 2000 and attrs["probe_seconds_total"] == 1.235
    assert "probe_step_seconds" not in attrs
    record = trial_record(study.trials[0])
    assert record.label == recipe.label() and record.predicted_peak_bytes == 1000
    assert record.memory_model == "replay" and record.recipe == recipe.to_dict()
    assert record.probe == ProbeResult(
        status="ok", device="cpu", peak_memory_bytes=2000, steps_done=4, seconds={"total": 1.235}
    )
    unprobed = study.ask()
    assert trial_record(unprobed).probe is None and trial_record(unprobed).repair_of is None


def test_a_confirmation_says_why_it_did_not_hold_up():
    held = Confirmation(**STORED_CONFIRMATION)
    assert held.words().startswith("held up: ")
    slower = dataclasses.replace(held, tokens_per_second=500.0, speed_change=-0.43, held_up=False)
    assert slower.words() == (
        "did not hold up: 500 tok/s, -43% off the first probe (it holds down to -15%)"
    )
    over = dataclasses.replace(held, speed_change=0.01, held_up=False, over_budget=True)
    assert over.words().endswith("but its peak went over the budget")
    # stored before over_budget was: a miss within the speed tolerance was the peak
    old = dataclasses.replace(held, speed_change=0.01, held_up=False, over_budget=None)
    assert old.words().endswith("but its peak went over the budget")
    crashed = dataclasses.replace(held, status="oom", reason="CUDA out of memory", held_up=False)
    assert crashed.words() == "did not hold up: oom: CUDA out of memory"


def test_a_confirmation_faster_beyond_the_tolerance_held_up_and_says_by_how_much(study):
    """Faster on the second probe by more than the tolerance is the speed's noise, not a miss;
    slower by as much, a peak over the budget or a failed probe still did not hold up."""
    assert holds_up(True, True, 0.43) and holds_up(True, True, -0.15)
    assert not holds_up(True, True, -0.43) and not holds_up(True, False, 0.43)
    assert not holds_up(False, True, 0.43)
    faster = Confirmation(**{**STORED_CONFIRMATION, "tokens_per_second": 8600.0})
    faster = dataclasses.replace(faster, speed_change=0.43)
    assert faster.words() == (
        "held up: 8,600 tok/s, 43% faster than the first probe "
        "(its speed varies by more than ±15% here)"
    )
    # Versions before this verdict stored a faster confirmation as not held up: it reads back
    # as held up, unless its peak went over the budget.
    record_confirmation(study, 1, dataclasses.replace(faster, held_up=False))
    record_confirmation(study, 2, dataclasses.replace(faster, held_up=False, over_budget=None))
    record_confirmation(study, 3, dataclasses.replace(faster, held_up=False, over_budget=True))
    read = confirmations(study)
    assert read[1] == faster and read[2].held_up and read[2].words() == faster.words()
    assert not read[3].held_up and read[3].removal() is not None
    assert read[3].words().startswith("did not hold up: ")
    assert read[3].words().endswith("but its peak went over the budget")


def test_the_end_of_a_run_says_several_trials_were_what_one_was():
    from autotune.study.records import TrialStatus
    from autotune.study.unmeasured import PROBE_FAILURE_WORDS, _agreeing

    assert _agreeing(PROBE_FAILURE_WORDS[TrialStatus.INTERRUPTED], 1) == "was interrupted"
    assert _agreeing(PROBE_FAILURE_WORDS[TrialStatus.REFUSED], 3) == "were refused"
    assert _agreeing(PROBE_FAILURE_WORDS[TrialStatus.CRASH], 3) == "crashed"
