"""The typed search space, campaign files, samplers and pruners by name or object, narrowing of
every kind of parameter, and the objective for int and categorical parameters (tiny data)."""
import dataclasses
import math
import textwrap

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import faultlib as fl
from clr_lambda_search.model.errors import ConfigError, InputError
from clr_lambda_search.model.train import TrainConfig
from clr_lambda_search.search import objective as objective_module
from clr_lambda_search.search.campaign import Campaign, load_campaign, parse_campaign, shipped
from clr_lambda_search.search import record
from clr_lambda_search.search.core import run_context, run_phase
from clr_lambda_search.search.phases import SearchPhase
from clr_lambda_search.search.samplers import MarginMedianPruner, make_pruner, make_sampler
from clr_lambda_search.search.space import (Categorical, Float, Int, make_space, narrow, space_from_dict,
                          space_to_dict, suggest)
from clr_lambda_search.search.study import open_storage

TINY_CONFIG = TrainConfig(m=10, n_batch=10, n_s=5, cycles=1, evals_per_cycle=2,
                          eval_train_samples=0, dtype="float64")


# ---- parameters -------------------------------------------------------------------------------

def test_int_and_categorical_parameters_suggest_values_of_the_field_type():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = make_space(Int("m", 20, 100, step=10), Categorical("n_batch", (50, 100, 200)),
                       Float("eta_max", 1e-2, 2e-1, log=True))
    for _ in range(20):
        values = suggest(study.ask(), space)
        # an int field gets an int on its step grid, a categorical one of its choices
        assert type(values["m"]) is int and values["m"] % 10 == 0 and 20 <= values["m"] <= 100
        assert values["n_batch"] in (50, 100, 200) and type(values["n_batch"]) is int
        assert type(values["eta_max"]) is float
        # and every draw makes a valid TrainConfig (what the objective builds)
        TrainConfig(**values)


@pytest.mark.parametrize("make, needle", [
    (lambda: Float("m", 20.0, 100.0), "int field"),          # a float range for an int field
    (lambda: Int("m", 20.5, 100), "integers"),
    (lambda: Int("lam", 1, 10), "float range"),              # an int range for a float field
    (lambda: Float("nope", 0.0, 1.0), "unknown parameter"),
    (lambda: Float("seed", 0.0, 1.0), "unknown parameter"),  # not searchable
    (lambda: Float("lam", 1e-5, math.inf, log=True), "finite"),
    (lambda: Float("lam", 1e-2, 1e-3), "below"),
    (lambda: Float("lam", 0.0, 1e-3, log=True), "> 0"),
    (lambda: Int("m", 10, 100, step=0), "step"),
    (lambda: Categorical("n_batch", (50, 50.5)), "do not fit"),
    (lambda: Categorical("n_batch", ()), "non-empty"),
    (lambda: make_space(Float("lam", 1e-5, 1e-1), Float("lam", 1e-4, 1e-2)), "twice"),
])
def test_a_parameter_that_does_not_fit_its_field_is_refused(make, needle):
    with pytest.raises(ConfigError, match=needle):
        make()


def test_space_round_trips_and_keeps_the_old_layout_of_a_float():
    space = make_space(Float("lam", 1e-5, 1e-1, log=True), Int("n_s", 400, 1200, step=100),
                       Categorical("n_batch", (50, 100)))
    items = space_to_dict(space)
    assert space_from_dict(items) == space
    # the releases that searched λ alone recorded exactly this: their studies resume unchanged
    assert items[0] == {"name": "lam", "low": 1e-5, "high": 1e-1, "log": True}


# ---- narrowing ----------------------------------------------------------------------------------

def test_narrowing_a_linear_float_widens_by_a_fraction_of_the_span_and_clips():
    p = narrow(Float("eta_max", 0.0, 1.0), [0.4, 0.5], margin=0.1)
    assert (p.low, p.high) == pytest.approx((0.3, 0.6))
    p = narrow(Float("eta_max", 0.0, 1.0), [0.05, 0.99], margin=0.1)
    assert (p.low, p.high) == pytest.approx((0.0, 1.0))  # clipped to the earlier range


def test_narrowing_an_int_rounds_outward_to_its_step_and_keeps_a_step():
    p = narrow(Int("n_s", 400, 1200, step=100), [700, 800], margin=0.1)  # pad 80: 620..880
    assert (p.low, p.high, p.step) == (600, 900, 100)
    one = narrow(Int("m", 10, 100), [50], margin=0.0001)  # a single value: still one step wide
    assert one.high - one.low >= 1 and one.low <= 50 <= one.high
    top = narrow(Int("m", 10, 100, step=10), [100], margin=0.0001)  # at the border, inside it
    assert (top.low, top.high) == (90, 100)
    logint = narrow(Int("m", 8, 512, log=True), [32, 64], margin=0.25)
    assert logint.low <= 32 and logint.high >= 64 and logint.log


def test_narrowing_keeps_a_categorical_parameters_choices():
    p = Categorical("n_batch", (50, 100, 200))
    assert narrow(p, [100], margin=0.25) == p


# ---- samplers and pruners ------------------------------------------------------------------------

SAMPLERS = ["RandomSampler", "TPESampler", "QMCSampler", "NSGAIISampler", "NSGAIIISampler",
            "BruteForceSampler"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_named_samplers_are_reseeded_per_trial(name):
    """Whatever a sampler drew before, trial n's draw depends on (study seed, n) only: workers
    that ran other trials never replay or skew one sequence (optuna_internals.reseed reaches into
    each class's private random state)."""
    def first_draw(history):
        sampler = make_sampler(name, 0)
        if history:  # the same sampler object has drawn for other trials first
            optuna.create_study(sampler=sampler).optimize(
                lambda t: t.suggest_int("x", 0, 1000), n_trials=history)
        return optuna.create_study(sampler=sampler).ask().suggest_int("x", 0, 1000)
    assert first_draw(0) == first_draw(3)
    # and another study seed draws another value
    other = optuna.create_study(sampler=make_sampler(name, 1)).ask().suggest_int("x", 0, 1000)
    assert other != first_draw(0)


def test_a_users_sampler_object_is_kept_and_reseeded():
    mine = optuna.samplers.TPESampler(multivariate=True, n_startup_trials=2, seed=123)
    sampler = make_sampler(mine, 7)
    # the very object the user passed, still a TPESampler, with its own settings
    assert sampler is mine and isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate is True

    def first(spec, seed=7):
        return optuna.create_study(sampler=make_sampler(spec, seed)).ask().suggest_float("x", 0, 1)
    # unseeded objects draw from the campaign's seed, like a sampler named in a campaign file
    assert first(optuna.samplers.TPESampler()) == first(optuna.samplers.TPESampler()) \
        == first("tpe")
    # a seed the user set is the study seed: another seed, other draws, whatever the campaign's
    assert first(optuna.samplers.RandomSampler(seed=42)) != first(
        optuna.samplers.RandomSampler(seed=7))
    assert first(optuna.samplers.RandomSampler(seed=42), 0) == first(
        optuna.samplers.RandomSampler(seed=42), 5)
    # and the same seed given in a campaign file draws the same values
    assert first(optuna.samplers.RandomSampler(seed=42)) == first(
        {"name": "RandomSampler", "seed": 42}) != first({"name": "RandomSampler", "seed": 7})
    assert make_sampler(optuna.samplers.RandomSampler(seed=42), 0).study_seed == 42


def test_each_phase_draws_its_own_values():
    """Phase p's trial n draws from (study seed, n, p): the first phase keeps the draws of the
    releases before phases were seeded apart, and no two (phase, trial) pairs share a seed."""
    from clr_lambda_search.search.samplers import trial_seed

    assert trial_seed(0, 3) == trial_seed(0, 3, phase=0) == int(
        np.random.SeedSequence([0, 3]).generate_state(1)[0])
    seeds = {trial_seed(0, n, p) for n in range(50) for p in range(4)}
    assert len(seeds) == 200

    def draws(phase):
        study = optuna.create_study(sampler=make_sampler("random", 0, phase=phase))
        return [study.ask().suggest_float("x", 0, 1) for _ in range(5)]
    assert not set(draws(0)) & set(draws(1)) and not set(draws(1)) & set(draws(2))


@pytest.mark.parametrize("spec, needle", [
    ("NoSuchSampler", "unknown sampler"),
    ({"name": "TPESampler", "bogus": 1}, "bad arguments"),
    ({"multivariate": True}, "name"),
    ("BaseSampler", "unknown sampler"),
])
def test_bad_sampler_specs_are_config_errors(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        make_sampler(spec, 0)


def test_a_sampler_whose_dependency_is_missing_says_so(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cmaes" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install cmaes"):
        make_sampler("CmaEsSampler", 0)


def test_pruners_by_short_name_class_name_or_object():
    assert isinstance(make_pruner("median", TINY_CONFIG), MarginMedianPruner)
    assert make_pruner("median", TINY_CONFIG).n_warmup_steps == TINY_CONFIG.n_s
    # the project's own pruner is nameable like Optuna's, with its arguments
    assert make_pruner({"name": "MarginMedianPruner", "margin": 0.05}, TINY_CONFIG).margin == 0.05
    assert isinstance(make_pruner({"name": "MedianPruner", "n_startup_trials": 2}, TINY_CONFIG),
                      optuna.pruners.MedianPruner)
    mine = optuna.pruners.NopPruner()
    assert make_pruner(mine, TINY_CONFIG) is mine
    with pytest.raises(ConfigError, match="unknown pruner"):
        make_pruner("nope", TINY_CONFIG)
    with pytest.raises(ConfigError, match="bad arguments"):
        make_pruner({"name": "MedianPruner", "bogus": 1}, TINY_CONFIG)


# ---- the objective and the studies ---------------------------------------------------------------

def _spec(space, name="s", n_trials=3, **kw):
    """A one-phase campaign (its study: <name>-coarse)."""
    return Campaign(name=name, phases=(SearchPhase(name="coarse", n_trials=n_trials, space=space,
                                                   pruner="none", **kw),),
                    config=tuple(vars(TINY_CONFIG).items()))


def run_spec(campaign, storage, data):
    """Run (or resume) the one phase of campaign; the study."""
    return run_phase(campaign, "coarse", data, storage)[0]


def test_searching_m_trains_each_trial_with_its_m_hidden_units(tmp_path, tiny_data, monkeypatch):
    seen = []
    real_fit = objective_module.fit

    def fit(data, config, **kw):
        params, history = real_fit(data, config, **kw)
        seen.append((config.m, params["W1"].shape))
        return params, history
    monkeypatch.setattr(objective_module, "fit", fit)
    url = fl.sqlite_url(tmp_path / "s.db")
    study = run_spec(_spec((Int("m", 3, 30),), n_trials=4), open_storage(url), tiny_data)
    ms = [t.params["m"] for t in study.trials]
    # every trial's W1 has that trial's m columns (D = 20 rows), and the trials drew several m
    assert [shape for _, shape in seen] == [(20, m) for m in ms] and len(set(ms)) > 1
    assert [m for m, _ in seen] == ms


def test_a_define_by_run_space_is_called_with_the_trial(tmp_path, tiny_data):
    def space(trial):
        return {"lam": trial.suggest_float("lam", 1e-4, 1e-1, log=True),
                "n_batch": trial.suggest_categorical("n_batch", [10, 20])}
    url = fl.sqlite_url(tmp_path / "s.db")
    study = run_spec(_spec(space, n_trials=2), open_storage(url), tiny_data)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(set(t.params) == {"lam", "n_batch"} for t in study.trials)
    # nothing describes such a space but its code: the study records none
    assert record.read(study).space is None


def test_resuming_with_another_space_is_refused_and_metric_is_named(tmp_path, tiny_data):
    url = fl.sqlite_url(tmp_path / "s.db")
    space = (Float("lam", 1e-5, 1e-1, log=True),)
    study = run_spec(_spec(space, n_trials=1), open_storage(url), tiny_data)
    # Optuna's tools call the objective by its name
    assert study.metric_names == ["val_acc"]
    for other in [(Float("lam", 1e-4, 1e-1, log=True),),
                  (Float("lam", 1e-5, 1e-1, log=True), Float("eta_max", 0.01, 0.2))]:
        with pytest.raises(InputError, match="other space settings"):
            run_spec(_spec(other, n_trials=2), open_storage(url), tiny_data)
    assert len(study.trials) == 1  # nothing ran


def test_a_study_of_the_previous_release_is_adopted(tmp_path):
    """Its attrs (written by the release that searched λ alone) match the dd2424 coarse phase."""
    url = fl.sqlite_url(tmp_path / "s.db")
    storage = open_storage(url)
    old = optuna.create_study(study_name="cifar10-coarse", storage=storage, direction="maximize")
    config = {"m": 50, "n_batch": 100, "eta_min": 1e-05, "eta_max": 0.1, "n_s": 800, "cycles": 2,
              "evals_per_cycle": 2, "eval_train_samples": 1000, "seed": 0, "dtype": "float32"}
    for key, value in {"campaign": "cifar10", "phase": "coarse", "config": config,
                       "space": [{"name": "lam", "low": 1e-05, "high": 0.1, "log": True}],
                       "sampler": "random", "grid": [], "pruner": "median", "repeats": 1,
                       "seed": 0}.items():
        old.set_user_attr(key, value)
    c = load_campaign("dd2424")
    study = c.phase("coarse").open(run_context(c, None, storage))  # no InputError: adopted
    assert study.user_attrs["config"] == config and study.user_attrs["phase_index"] == 0


# ---- campaign files ------------------------------------------------------------------------------

def test_dd2424_is_the_reports_protocol():
    c = load_campaign("dd2424")
    assert c.name == "cifar10" and [p.name for p in c.phases] == ["coarse", "fine", "confirm"]
    confirm = c.phase("confirm")
    assert (confirm.sources, confirm.top_k, confirm.seeds) == (("coarse", "fine"), 3, 5)
    coarse = c.phase("coarse")
    # the search protocol of the releases before campaign files, field by field
    assert c.phase_config(coarse) == TrainConfig(n_s=800, cycles=2, evals_per_cycle=2,
                                        eval_train_samples=1000)
    assert coarse.space == (Float("lam", 1e-5, 1e-1, log=True),)
    assert (coarse.sampler, coarse.pruner, coarse.n_trials, c.seed) == ("random", "median", 10, 0)
    fine = c.phase("fine")
    assert (fine.sampler, fine.n_trials, fine.narrow) == ("tpe", 12, {"from": "coarse", "top_k": 3,
                                                                      "margin": 0.25})
    final = c.final.training_config(c, {"lam": 3e-4}, 49_000)
    assert (final.n_s, final.cycles, final.lam, c.final.seeds) == (980, 3, 3e-4, 3)


def test_every_shipped_campaign_loads():
    assert {"dd2424", "example", "eta_max"} <= set(shipped())
    for name in shipped():
        assert load_campaign(name).phases


def test_final_n_s_rule_is_evaluated_with_the_best_n_batch():
    c = load_campaign("example")
    # the best n_batch applies first, then "2 epochs" = 2·⌊49,000 / 200⌋; the final's cycles win
    config = c.final.training_config(c, {"lam": 1e-3, "n_batch": 200, "cycles": 9}, 49_000)
    assert (config.n_batch, config.n_s, config.cycles) == (200, 490, 3)


BAD = {  # name: (TOML text, what the one-line error must name)
    "malformed": ('name = "x"\n[[phases]\n', "line 2, column"),
    "duplicated-param": ('[[phases]]\nname = "a"\nparams.lam = {low = 1e-5, high = 1e-1}\n'
                         'params.lam = {low = 1e-4, high = 1e-2}\n', "given twice"),
    "unknown-param": ('[[phases]]\nname = "a"\nparams.nope = {low = 1, high = 2}\n',
                      "phases[0].params.nope"),
    "non-finite": ('[[phases]]\nname = "a"\nparams.lam = {low = 1e-5, high = inf}\n',
                   "phases[0].params.lam"),
    "float-range-int-field": ('[[phases]]\nname = "a"\nparams.m = {low = 20.5, high = 100}\n',
                              "phases[0].params.m"),
    "low-above-high": ('[[phases]]\nname = "a"\nparams.lam = {low = 1e-1, high = 1e-5}\n',
                       "phases[0].params.lam"),
    "log-low-zero": ('[[phases]]\nname = "a"\nparams.lam = {low = 0.0, high = 1e-1, log = true}\n',
                     "phases[0].params.lam"),
    "unknown-sampler": ('[[phases]]\nname = "a"\nsampler = "Nope"\nparams.lam = {low = 1e-5, '
                        'high = 1e-1}\n', "phases[0].sampler"),
    "sampler-bad-args": ('[[phases]]\nname = "a"\nsampler = {name = "TPESampler", bogus = 1}\n'
                         'params.lam = {low = 1e-5, high = 1e-1}\n', "phases[0].sampler"),
    "unknown-pruner": ('[[phases]]\nname = "a"\npruner = "Nope"\nparams.lam = {low = 1e-5, '
                       'high = 1e-1}\n', "phases[0].pruner"),
    "pruner-bad-args": ('[[phases]]\nname = "a"\npruner = {name = "MedianPruner", x = 1}\n'
                        'params.lam = {low = 1e-5, high = 1e-1}\n', "phases[0].pruner"),
    "empty-phase": ('[[phases]]\nname = "a"\nn_trials = 3\n', "phases[0]"),
    "narrow-no-earlier": ('[[phases]]\nname = "a"\nnarrow = {from = "b"}\n', "phases[0].narrow.from"),
    "unknown-key": ('nmae = "x"\n[[phases]]\nname = "a"\nparams.lam = {low = 1e-5, high = 1e-1}\n',
                    "nmae"),
    "no-phases": ('name = "x"\n', "phases"),
    "bad-final-n-s": ('[[phases]]\nname = "a"\nparams.lam = {low = 1e-5, high = 1e-1}\n'
                      '[final]\nn_s = "two epochs"\n', "final.n_s"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_campaign_file_is_one_config_error_naming_file_and_key(name, tmp_path):
    text, needle = BAD[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_campaign(str(path))
    message = str(e.value)
    # one line that names the file and the key (or line and column), and says what to do
    assert "\n" not in message and str(path) in message and needle in message, message


def test_parse_campaign_of_a_dict_gives_the_same_campaign_as_its_file(tmp_path):
    text = textwrap.dedent('''
        name = "x"
        [[phases]]
        name = "a"
        params.m = { low = 10, high = 40, step = 10 }
        params.n_batch = { choices = [10, 20] }
    ''')
    path = tmp_path / "x.toml"
    path.write_text(text)
    c = load_campaign(str(path))
    assert c.phase("a").space == (Int("m", 10, 40, step=10), Categorical("n_batch", (10, 20)))
    assert dataclasses.replace(c, source="") == dataclasses.replace(
        parse_campaign({"name": "x", "phases": [{"name": "a", "params": {
            "m": {"low": 10, "high": 40, "step": 10}, "n_batch": {"choices": [10, 20]}}}]}),
        source="")
