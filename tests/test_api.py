"""The Python API: the examples of README.md and docs/python-api.md, extracted and run as a user
would (on the tiny CIFAR-10), and run_campaign on a campaign file."""
import functools
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.model import dataset as data_module
from clr_lambda_search.search import record
from clr_lambda_search.search.api import run_campaign
from clr_lambda_search.search.study import open_storage

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "python-api.md"


def readme_example(heading="One study with your own space, sampler and pruner", page=API_DOC):
    """The Python example of a page: the ```python block of its section `heading`."""
    section = page.read_text().split(f"## {heading}", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    assert len(blocks) == 1, "the section holds one Python example"
    return blocks[0]


def run_example(code, tmp_path, cifar_tiny_dir, monkeypatch):
    """Run a README example verbatim, as a user would, on the tiny CIFAR-10 in tmp_path; its
    globals."""
    # the tiny data set has 200 training images: 20 of them validate
    monkeypatch.setattr(data_module, "load_cifar10",
                        functools.partial(data_module.load_cifar10, n_val=20))
    monkeypatch.setenv("CIFAR10_DIR", str(cifar_tiny_dir.batches))
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the example, verbatim
    return scope


@pytest.mark.timeout(300)
def test_readme_example_runs_with_the_users_sampler(tmp_path, cifar_tiny_dir, monkeypatch):
    code = readme_example()
    assert 10 <= len(code.strip().splitlines()) <= 15  # a short script, as promised
    made = []

    class SpyTPE(optuna.samplers.TPESampler):  # the user's sampler class, watched
        def before_trial(self, study, trial):
            made.append(trial.number)
            super().before_trial(study, trial)
    monkeypatch.setattr(optuna.samplers, "TPESampler", SpyTPE)
    study = run_example(code, tmp_path, cifar_tiny_dir, monkeypatch)["study"]
    trials = study.get_trials()
    # the example ran to its 8 complete trials, searching both parameters
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 8
    assert all(set(t.params) == {"lam", "eta_max"} for t in trials)
    # and every one of them was sampled by the user's own sampler object
    assert sorted(made) == [t.number for t in trials]
    assert (tmp_path / "studies" / "studies.db").is_file()


@pytest.mark.timeout(300)
def test_run_campaign_runs_every_phase_of_a_file(tmp_path, tiny_data):
    path = tmp_path / "c.toml"
    path.write_text('name = "api"\n[search]\nm = 10\nn_batch = 10\nn_s = 5\ncycles = 1\n'
                    'evals_per_cycle = 2\neval_train_samples = 0\ndtype = "float64"\n'
                    '[[phases]]\nname = "a"\nn_trials = 3\npruner = "none"\n'
                    'params.eta_max = { low = 0.01, high = 0.2, log = true }\n'
                    '[[phases]]\nname = "b"\nn_trials = 2\npruner = "none"\n'
                    'narrow = { from = "a", top_k = 2 }\n'
                    '[final]\nseeds = 1\nn_s = 5\nm = 10\nn_batch = 10\ncycles = 1\n'
                    'eval_train_samples = 0\ndtype = "float64"\n')
    url = fl.sqlite_url(tmp_path / "s.db")
    # a CampaignResult (a list of the phases' studies before the campaign core): the final run
    # is part of the campaign now
    result = run_campaign(str(path), tiny_data, url, out_dir=tmp_path / "out", dashboard=False)
    assert result.studies == ["api-a", "api-b", "api-final"]
    assert [p["study"] for p in result.phases] == ["api-a", "api-b"]
    storage = open_storage(url)
    a, b = (optuna.load_study(study_name=n, storage=storage) for n in result.studies[:2])
    best2 = sorted((t for t in a.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:2]
    # the second phase searched η_max alone, inside the range derived from the first's best two
    (space,) = record.read(b).space
    assert space["low"] <= min(t.params["eta_max"] for t in best2)
    assert all(set(t.params) == {"eta_max"} for t in a.trials + b.trials)
    # the final run trained the second phase's best
    assert result.source["study"] == "api-b" and set(result.pick) == {"eta_max"}
    assert result.pick["eta_max"] == max((t for t in b.trials if t.state == TrialState.COMPLETE),
                                         key=lambda t: t.value).params["eta_max"]


@pytest.mark.timeout(300)
def test_readme_campaign_example_runs_every_phase(tmp_path, cifar_tiny_dir, monkeypatch,
                                                 capsys):
    from clr_lambda_search.search import api

    code = readme_example("The whole campaign from Python", README)
    real = api.run_campaign
    tiny = {"search.n_s": 5, "search.cycles": 1, "phases.fine.n_trials": 3,
            "final.n_s": 5, "final.cycles": 1}

    def run_campaign_tiny(campaign, data, storage, *, overrides=None, **kwargs):
        # the README's call, its own overrides kept, on a protocol tiny enough for a test
        return real(campaign, data, storage, overrides={**overrides, **tiny}, **kwargs)
    monkeypatch.setattr(api, "run_campaign", run_campaign_tiny)
    result = run_example(code, tmp_path, cifar_tiny_dir, monkeypatch)["result"]
    out = capsys.readouterr().out
    assert result.verdict["sentence"] in out and f"{result.test_acc:.4f}" in out
    storage = f"sqlite:///{tmp_path}/studies/studies.db"
    coarse = optuna.load_study(study_name="cifar10-coarse", storage=storage)
    assert sum(t.state == TrialState.COMPLETE for t in coarse.trials) == 6  # its overrides
    confirm = optuna.load_study(study_name="cifar10-confirm", storage=storage)
    assert record.read(confirm).seeds == [1000, 1001, 1002]
    assert [t.user_attrs["seed"] for t in optuna.load_study(
        study_name="cifar10-final", storage=storage).trials] == [0, 1]
