"""A live worker whose trial a recovery failed meanwhile (its heartbeat starved on an overloaded
machine: seen with 64 workers on 2 cores, tests/loadtest.py) goes on with the next trial instead
of dying with Optuna's "Cannot tell a FAIL trial"."""
import optuna
from optuna.trial import TrialState

from clr_lambda_search.search.study import open_storage
from clr_lambda_search.search.workers import TrialTarget, work


def test_a_worker_taken_for_dead_goes_on(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        if trial.number == 0:  # what recovery does to a trial whose heartbeat is stale
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return x

    work(study, objective, TrialTarget(n=2))
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 2, states
    assert study.trials[0].state == TrialState.FAIL
