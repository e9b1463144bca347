"""--set and the flags that are its shortcuts, on every command; --dry-run.

Every key of every shipped campaign's schema (search.settings.keys) is set through the command
line's parsing path (parse_args, then the command's own resolution) and must land in the resolved
campaign; an invalid value for it must exit 2 with one line naming the key. These run in-process
(milliseconds each); a few real subprocesses check the commands end to end, and that a dry run
writes nothing.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from clr_lambda_search.model.schedule import step_size
from clr_lambda_search.search import plan, settings
from clr_lambda_search.search.budget import parse_budget
from clr_lambda_search.search.campaign import load_campaign, shipped
from clr_lambda_search.search.cli import (bench, dashboard, final, gradcheck, pipeline, search,
                                          train)
from clr_lambda_search.search.cli.errors import run
from clr_lambda_search.search.space import Categorical

# Two valid values of each TrainConfig field (the test takes one that differs from the
# campaign's), as TOML, and one that the file's checks refuse.
FIELD_VALUES = {"lam": ("0.002", "0.003", "-1.0"), "m": ("20", "30", "0"),
                "n_batch": ("50", "40", "0"), "eta_min": ("2e-5", "3e-5", "-1.0"),
                "eta_max": ("0.05", "0.06", "-1.0"), "n_s": ("300", "200", "0"),
                "cycles": ("1", "2", "0"), "evals_per_cycle": ("3", "5", "0"),
                "eval_train_samples": ("500", "600", "-1"), "seed": ("7", "8", "-1"),
                "dtype": ('"float64"', '"float32"', '"float16"'), "dropout": ("0.2", "0.3", "1.5"),
                "flip": ("true", "false", "3"), "shift": ("2", "3", "-1"),
                "precision": ('"auto"', '"fp32"', '"fp8"')}
CAMPAIGNS = shipped()


def valid_text(c, key):
    """A valid value of key in campaign c (TOML text), other than its current one."""
    last, current = key.split(".")[-1], settings.get(c, key)
    if key == "final.n_s":
        return '"3 epochs"'
    if last == "budget":
        return '"1e5 updates"'
    if last == "start":  # a configuration inside the phase's space
        space = c.phase(key.split(".")[1]).base_space(c)
        values = {p.name: p.choices[0] if isinstance(p, Categorical) else plan.typical((p,))[p.name]
                  for p in space}
        return "[{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "}]"
    if last == "sampler":
        return '"random"' if current == "tpe" else '"tpe"'
    if last == "pruner":
        return '"none"'
    if last == "margin":
        return "0.5"
    if last in FIELD_VALUES and key != "seed" and not key.endswith(("top_k", "seeds")):
        return next(v for v in FIELD_VALUES[last][:2] if settings.parse_value(v) != current)
    return str((current or 5) + 1)  # a count: n_trials, repeats, top_k, seeds, max_*, seed


def invalid_text(key):
    last = key.split(".")[-1]
    if key == "final.n_s":
        return '"3 weeks"'
    if last == "budget":
        return '"3 parsecs"'
    if last == "start":
        return "[{nosuch = 1}]"
    if last in ("sampler", "pruner"):
        return '"NoSuchThing"'
    if last == "margin":
        return "-1"
    if last in FIELD_VALUES and key != "seed" and not key.endswith(("top_k", "seeds")):
        return FIELD_VALUES[last][2]
    return "0" if key != "seed" else "-1"


def resolve(command, name, key, text):
    """The campaign `command` resolves from --config name --set key=text (in-process)."""
    argv = ["--config", name, "--set", f"{key}={text}"]
    if command == "pipeline":
        return pipeline.build_campaign(pipeline.parse_args(argv))
    if command == "final":
        return final.build_campaign(final.parse_args(argv))[0]
    return search.build_campaign(search.parse_args([command, *argv]))  # a phase's name


def commands_of(c, key):
    """The commands that take key: pipeline always; the phase command of the phase it names
    (of every phase, for a shared key); final for final.*."""
    parts = key.split(".")
    if parts[0] == "phases":
        return ["pipeline", parts[1]]
    if parts[0] == "final":
        return ["pipeline", "final"]
    return ["pipeline", "final", *[p.name for p in c.phases]]


def searched_and_fixed(c, key):
    """Whether key fixes a parameter a search phase searches (refused: searched and fixed)."""
    parts = key.split(".")
    if parts[0] == "phases" and "n_trials" not in c.phase(parts[1]).settings:
        return False  # a confirm phase trains its candidates' values
    return parts[-1] in c.searched_names() and (parts[0] == "search" or ".config." in key)


def refused_with_bf16(c, key):
    """Whether key changes dtype where the campaign or its section asks for bf16 products
    (refused: bf16 keeps float32 master weights, and every section inherits [config])."""
    if not key.endswith("dtype"):
        return False
    asked = {settings.get(c, "config.precision"),
             settings.get(c, key.removesuffix("dtype") + "precision")}
    return asked != {"fp32"}


def comparable(key, value):
    """A value as the campaign holds it: a budget by its text, a start list as a tuple."""
    if key.endswith(".budget"):
        return str(parse_budget(value) if isinstance(value, str) else value)
    return tuple(value) if key.endswith(".start") else value


@pytest.fixture
def exits(capsys):
    """exits(fn) -> (exit status, stderr) of fn run as a command's main (search.cli.errors.run)."""
    before = signal.getsignal(signal.SIGTERM)

    def call(fn):
        with pytest.raises(SystemExit) as e:
            run(fn)
        return e.value.code, capsys.readouterr().err
    yield call
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("name", CAMPAIGNS)
def test_every_key_set_on_the_command_line_lands_in_the_resolved_campaign(name):
    c = load_campaign(name)
    landed, refused = 0, []
    for key in settings.keys(c):
        text = valid_text(c, key)
        want = settings.parse_value(text)
        assert want != settings.get(c, key), key  # the test changes something
        for command in commands_of(c, key):
            if searched_and_fixed(c, key):
                with pytest.raises(Exception, match="both searched and fixed"):
                    resolve(command, name, key, text)
                refused.append(key)
                continue
            if refused_with_bf16(c, key):
                with pytest.raises(Exception, match="precision with dtype"):
                    resolve(command, name, key, text)
                refused.append(key)
                continue
            got = settings.get(resolve(command, name, key, text), key)
            assert comparable(key, got) == comparable(key, want), (command, key)
            landed += 1
    assert landed > 3 * len(settings.keys(c)) // 2 and len(set(refused)) < 25


@pytest.mark.parametrize("name", CAMPAIGNS)
def test_an_invalid_value_of_every_key_is_exit_2_naming_it(name, exits):
    c = load_campaign(name)
    for key in settings.keys(c):
        for command in commands_of(c, key)[:2]:
            status, err = exits(lambda: resolve(command, name, key, invalid_text(key)))
            assert status == 2 and err.count("\n") == 1 and key in err, (command, key, err)
            assert "Traceback" not in err and "unexpected" not in err, err


FLAG_CASES = [  # (command argv with a flag, the same with --set)
    (["pipeline", "--coarse-trials", "4"], ["pipeline", "--set", "phases.coarse.n_trials=4"]),
    (["pipeline", "--fine-trials", "4"], ["pipeline", "--set", "phases.fine.n_trials=4"]),
    (["pipeline", "--search-n-s", "20"], ["pipeline", "--set", "search.n_s=20"]),
    (["pipeline", "--search-cycles", "1"], ["pipeline", "--set", "search.cycles=1"]),
    (["pipeline", "--final-n-s", "20"], ["pipeline", "--set", "final.n_s=20"]),
    (["pipeline", "--final-cycles", "1"], ["pipeline", "--set", "final.cycles=1"]),
    (["pipeline", "--seeds", "5"], ["pipeline", "--set", "final.seeds=5"]),
    (["pipeline", "--seed", "3"], ["pipeline", "--set", "seed=3"]),
    (["pipeline", "--repeats", "2"], ["pipeline", "--set", "phases.coarse.repeats=2", "--set",
                                      "phases.fine.repeats=2"]),
    (["pipeline", "--pruner", "none"], ["pipeline", "--set", "phases.coarse.pruner=none",
                                        "--set", "phases.fine.pruner=none"]),
    (["coarse", "--n-trials", "4"], ["coarse", "--set", "phases.coarse.n_trials=4"]),
    (["coarse", "--sampler", "tpe"], ["coarse", "--set", "phases.coarse.sampler=tpe"]),
    (["coarse", "--n-s", "20", "--m", "10"], ["coarse", "--set", "phases.coarse.config.n_s=20",
                                              "--set", "phases.coarse.config.m=10"]),
    (["coarse", "--train-seed", "9"], ["coarse", "--set", "phases.coarse.config.seed=9"]),
    (["coarse", "--seed", "9"], ["coarse", "--set", "seed=9"]),
    (["fine", "--top-k", "2", "--margin", "0.5"], ["fine", "--set", "phases.fine.narrow.top_k=2",
                                                   "--set", "phases.fine.narrow.margin=0.5"]),
    (["confirm", "--top-k", "2"], ["confirm", "--set", "phases.confirm.top_k=2"]),
    (["final", "--seeds", "5", "--lam", "0.001"], ["final", "--set", "final.seeds=5", "--set",
                                                   "final.lam=0.001"]),
    (["final", "--n-s", "30"], ["final", "--set", "final.n_s=30"]),
]


def _resolved(argv):
    if argv[0] == "pipeline":
        return pipeline.build_campaign(pipeline.parse_args(argv[1:]))
    if argv[0] == "final":
        return final.build_campaign(final.parse_args(argv[1:]))[0]
    return search.build_campaign(search.parse_args(argv))


@pytest.mark.parametrize("flag, pairs", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_a_flag_is_a_shortcut_of_its_key(flag, pairs):
    base = _resolved(flag[:1])
    c = _resolved(flag)
    assert c.digest() != base.digest()
    assert c.digest() == _resolved(pairs).digest()


def test_set_wins_over_its_flag():
    c = _resolved(["pipeline", "--coarse-trials", "4", "--set", "phases.coarse.n_trials=6"])
    assert c.phase("coarse").n_trials == 6


@pytest.mark.parametrize("module, argv, needle", [
    (pipeline, ["--set", "phases.coarse.n_trial=3"], "did you mean phases.coarse.n_trials"),
    (search, ["coarse", "--set", "phases.coarse.pruner=median", "--set", "serch.n_s=3"],
     "did you mean search.n_s"),
    (search, ["confirm", "--set", "phases.confirm.seed=7"], "did you mean phases.confirm.seeds"),
    (search, ["status", "--set", "final.seed=1", "--set", "finl.seeds=1"],
     "did you mean final.seeds"),
    (search, ["retire", "fine", "--set", "phases.fine.n_trails=1"],
     "did you mean phases.fine.n_trials"),
    (final, ["--set", "final.seedss=2"], "did you mean final.seeds"),
    (dashboard, ["--set", "phases.coarse.n_trals=2"], "did you mean phases.coarse.n_trials"),
    (train, ["--set", "config.lamb=0.1"], "did you mean config.lam"),
    (gradcheck, ["--set", "config.mm=3"], "did you mean config.m"),
    (bench, ["--set", "final.seedss=1"], "did you mean final.seeds"),
    (search, ["confirm", "--n-trials", "3"], "--n-trials does not apply to phase confirm"),
    (search, ["coarse", "--top-k", "3"], "--top-k does not apply to phase coarse"),
    (pipeline, ["--config", "eta_max", "--set", "final.seeds=0"], "final.seeds"),
    (train, ["--set", "config.dropout=2.0"], "config.dropout"),
    (gradcheck, ["--set", "config.m=0"], "--m"),
    (search, ["retire", "fine", "--dry-run"], "retire takes no --dry-run"),
])
def test_an_unknown_key_or_a_bad_value_on_any_command_is_one_line(module, argv, needle, exits,
                                                                   monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    monkeypatch.setattr(sys, "argv", ["clr-search", *argv])
    status, err = exits(module.main)
    assert status == 2 and err.count("\n") == 1 and needle in err, err
    assert not list(tmp_path.iterdir())


def test_train_and_gradcheck_take_their_keys():
    args = train.parse_args(["--set", "config.lam=0.002", "--set", "config.flip=true"])
    config = train.train_config(args)
    assert (config.lam, config.flip) == (0.002, True)
    args = gradcheck.parse_args(["--set", "config.m=7", "--set", "config.lam=0.2"])
    assert (args.m, args.lam) == (7, 0.2)


# ---- --dry-run ----------------------------------------------------------------------------------

def fixed_timer(config):
    return 1e-3, 0.0  # a millisecond an update, evaluations free


def test_the_estimate_adds_every_part_of_the_campaign():
    c = settings.apply(load_campaign("dd2424"), {"phases.coarse.repeats": 2,
                                                 "phases.confirm.seeds": 4})
    p = plan.plan(c, [ph.name for ph in c.phases] + ["final"], 49_000, 1_000, timer=fixed_timer)
    search_updates = 2 * 800 * 2  # cycles × 2·n_s
    assert [r["updates"] for r in p["phases"]] == [10 * 2 * search_updates, 12 * search_updates,
                                                   3 * 4 * search_updates]
    assert p["final"]["updates"] == 3 * 2 * 980 * 3
    assert p["updates"] == sum(r["updates"] for r in p["phases"]) + p["final"]["updates"]
    assert p["seconds"] == pytest.approx(p["updates"] * 1e-3)


def test_a_searched_n_s_counts_at_the_middle_of_its_range():
    c = load_campaign("example")  # n_s in 400..1200, n_batch in {50, 100, 200}
    p = plan.plan(c, ["coarse", "final"], 49_000, 1_000, timer=fixed_timer)
    assert p["phases"][0]["updates_per_training"] == 2 * 800 * 2
    assert p["final"]["config"]["n_batch"] is None  # searched: known at run time
    n_s = step_size(49_000, 117, 2)  # "2 epochs" at the mean choice of n_batch
    assert p["final"]["updates_per_training"] == 2 * n_s * 3


def test_a_budget_cuts_the_estimate_of_its_phase():
    c = settings.apply(load_campaign("dd2424"), {"phases.coarse.budget": "1e4 updates"})
    row = plan.plan(c, ["coarse"], 49_000, 1_000, timer=fixed_timer)["phases"][0]
    assert row["updates_without_budget"] == 10 * 3200 and row["updates"] == 10_000
    c = settings.apply(load_campaign("dd2424"), {"phases.coarse.budget": "20 s"})
    assert plan.plan(c, ["coarse"], 49_000, 1_000, timer=fixed_timer)["seconds"] == \
        pytest.approx(20)


def _command(tmp_path, *argv):
    env = dict(os.environ)
    env.pop("OPTUNA_STORAGE", None)  # the default storage: a dry run must not create it
    return subprocess.run([sys.executable, "-m", "clr_lambda_search", *argv], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.timeout(300)
def test_dry_runs_print_the_plan_and_write_nothing(tmp_path):
    proc = _command(tmp_path, "pipeline", "--dry-run", "--json", "--set",
                    "phases.coarse.n_trials=4", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["name"] for r in out["phases"]] == ["coarse", "fine", "confirm"]
    assert out["phases"][0]["n_trials"] == 4 and out["final"]["seeds"] == 2
    assert out["updates"] == (4 + 12 + 15) * 3200 + 2 * 5880
    assert out["seconds"] > 0 and all(r["step_ms"] > 0 for r in out["phases"])
    proc = _command(tmp_path, "confirm", "--dry-run", "--set", "phases.confirm.seeds=7")
    assert proc.returncode == 0, proc.stderr
    assert "× 7 paired seeds" in proc.stdout and "21 trainings" in proc.stdout
    proc = _command(tmp_path, "final", "--dry-run", "--json", "--lam", "0.001")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["final"]["pick"] == {"lam": 0.001}
    assert not list(tmp_path.iterdir())  # no studies/, no storage


@pytest.mark.timeout(300)
def test_a_bad_key_in_a_real_command_is_one_line_and_leaves_no_storage(tmp_path):
    db = tmp_path / "s.db"
    proc = _command(tmp_path, "phase", "coarse", "--storage", f"sqlite:///{db}", "--set",
                    "phases.coarse.n_trials=0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "phases.coarse.n_trials" in proc.stderr
    proc = _command(tmp_path, "phase", "coarse", "--dry-run", "--storage", f"sqlite:///{db}",
                    "--set", "phases.coarse.n_trial=2")
    assert proc.returncode == 2 and "did you mean phases.coarse.n_trials" in proc.stderr
    assert not list(tmp_path.iterdir())
