"""Budgets in compute (search.budget): a phase given updates or seconds stops within one trial's
cost of its budget, with one worker or two; a pruned trial is charged the updates it trained;
and a phase's start configurations are queued first, once."""
import optuna
import pytest
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.model.errors import ConfigError
from clr_lambda_search.search import budget as budget_module
from clr_lambda_search.search import record
from clr_lambda_search.search.budget import Budget, parse_budget
from clr_lambda_search.search.campaign import parse_campaign
from clr_lambda_search.search.core import run_phase

N_S, CYCLES = 5, 2
TRIAL_UPDATES = 2 * N_S * CYCLES  # what one tiny trial trains in full (1 seed)


def campaign(**phase):
    return parse_campaign({
        "name": "b", "search": {"m": 10, "n_batch": 10, "n_s": N_S, "cycles": CYCLES,
                                "eval_train_samples": 0, "dtype": "float64"},
        "phases": [{"name": "a", "pruner": "none",
                    "params": {"lam": {"low": 1e-5, "high": 1e-1, "log": True}}, **phase}],
        "final": {"seeds": 1}})


@pytest.mark.parametrize("text, unit, amount", [
    ("1e6 updates", "updates", 1e6), ("250 steps", "updates", 250), ("20 min", "seconds", 1200),
    ("90 s", "seconds", 90), ("2 h", "seconds", 7200), (" 1.5 minutes ", "seconds", 90)])
def test_parse_budget(text, unit, amount):
    assert parse_budget(text) == Budget(unit, amount)


@pytest.mark.parametrize("text", ["", "20", "min", "3 parsecs", "-5 min", "0 updates",
                                  "1e400 updates", "1e13 updates", "nan s", "400 days", 20, None])
def test_a_bad_budget_names_the_form(text):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(text)


def test_a_bad_budget_in_a_file_names_the_key():
    with pytest.raises(ConfigError, match=r"phases\[0\]\.budget"):
        campaign(budget="lots")


def _charged(study):
    return budget_module.spent(study.get_trials(deepcopy=False), "updates")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_an_updates_budget_stops_within_one_trials_cost(tmp_path, tiny_data, workers):
    amount = 3.5 * TRIAL_UPDATES
    study, _ = run_phase(campaign(budget=f"{amount:g} updates"), "a", tiny_data,
                         fl.sqlite_url(tmp_path / "s.db"), workers=workers)
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(t.user_attrs["updates"] == TRIAL_UPDATES for t in trained)
    assert amount <= _charged(study) < amount + TRIAL_UPDATES
    assert len(trained) == 4  # no n_trials given: the budget alone ended the phase
    assert record.read(study).budget == f"{amount:g} updates"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.timeout(240)
def test_pruned_trials_are_charged_what_they_trained(tmp_path, tiny_data):
    # the threshold pruner prunes every trial at its first report (val acc < 1): each costs
    # the updates up to that report, so the budget buys more trials than full ones would
    phase = {"budget": f"{2 * TRIAL_UPDATES} updates", "max_pruned": 100,
             "pruner": {"name": "ThresholdPruner", "lower": 1.0}}
    study, _ = run_phase(campaign(**phase), "a", tiny_data, fl.sqlite_url(tmp_path / "s.db"))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) > 2
    assert all(t.user_attrs["updates"] == max(t.intermediate_values) < TRIAL_UPDATES
               for t in pruned)
    assert 2 * TRIAL_UPDATES <= _charged(study) < 3 * TRIAL_UPDATES


@pytest.mark.timeout(240)
def test_a_time_budget_sums_the_recorded_training_seconds(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    study, _ = run_phase(campaign(budget="1 s"), "a", tiny_data, url)
    seconds = [t.user_attrs["seconds"] for t in study.trials]
    assert sum(seconds) >= 1 > sum(seconds[:-1])  # the last trial crossed it
    # resumed with a larger budget, the phase goes on from what is recorded
    study, _ = run_phase(campaign(budget="2 s"), "a", tiny_data, url)
    seconds = [t.user_attrs["seconds"] for t in study.trials]
    assert sum(seconds) >= 2 > sum(seconds[:-1])


@pytest.mark.timeout(240)
def test_start_configurations_are_queued_first_once(tmp_path, tiny_data):
    start = [{"lam": 0.001}, {"lam": 0.03}]
    url = fl.sqlite_url(tmp_path / "s.db")
    study, _ = run_phase(campaign(n_trials=3, start=start), "a", tiny_data, url)
    assert [t.params for t in study.trials[:2]] == start
    study, _ = run_phase(campaign(n_trials=5, start=start), "a", tiny_data, url)
    params = [t.params["lam"] for t in study.trials]
    assert len(params) == 5 and params.count(0.001) == 1 and params.count(0.03) == 1


@pytest.mark.parametrize("start, match", [
    ([{"lam": 5.0}], "outside its range"), ([{"m": 20}], "not a searched parameter"),
    ([{}], "a list of configurations"), ("lam", "a list of configurations")])
def test_a_bad_start_configuration_is_refused_before_anything_runs(start, match):
    with pytest.raises(ConfigError, match=match):
        campaign(start=start)


def _trial(state, updates=None, number=0):
    attrs = {} if updates is None else {"updates": updates}
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=0.5 if state == TrialState.COMPLETE else None,
        datetime_start=None, datetime_complete=None, params={}, distributions={},
        user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number)


def test_the_study_target_counts_running_trials_against_the_budget():
    from clr_lambda_search.search.workers import TrialTarget

    goal = TrialTarget(1000, budget=Budget("updates", 100), trial_updates=30)
    two_done = [_trial(TrialState.COMPLETE, 30), _trial(TrialState.COMPLETE, 30)]
    assert goal.may_start(two_done) and not goal.done(two_done)
    # 60 spent and one trial running (30 more): a fourth may start, as the budget is not
    # reached by those (all end within one trial of it); with two running it may not
    running = _trial(TrialState.RUNNING)
    assert goal.may_start(two_done + [running])
    assert not goal.may_start(two_done + [running, running])
    assert goal.done(two_done + [_trial(TrialState.PRUNED, 40)])


def test_a_trial_that_raced_past_the_budget_is_surplus_before_it_trains():
    # runners that looked at the study at once all passed may_start: of their new trials, the
    # ones whose earlier trials (spent + running) already commit the budget must not train,
    # else N racing runners overrun it by N trials instead of one
    from clr_lambda_search.search.workers import TrialTarget

    goal = TrialTarget(1000, budget=Budget("updates", 100), trial_updates=30)
    trials = [_trial(TrialState.COMPLETE, 30, 0), _trial(TrialState.COMPLETE, 30, 1),
              _trial(TrialState.RUNNING, None, 2), _trial(TrialState.RUNNING, None, 3),
              _trial(TrialState.RUNNING, None, 4)]
    # trial 2: 60 spent, nothing running before it -> trains
    assert goal.bookkeeping(trials[2], trials) is None
    # trial 3: 60 spent + trial 2's 30 = 90 < 100 -> trains (ends at most one trial past 100)
    assert goal.bookkeeping(trials[3], trials) is None
    # trial 4: 60 + 2 x 30 = 120 >= 100 -> surplus, though only 60 are spent yet
    assert goal.bookkeeping(trials[4], trials) == record.SURPLUS
