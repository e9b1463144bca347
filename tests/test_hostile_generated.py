"""Hostile input generated from the interfaces themselves (issue 21): every flag of every command
and every campaign key crossed with a table of hostile values, and every file read back
corrupted; each case ends with exit 0, or exit 2 with one line naming what was wrong and nothing
written (tests/hostilelib.py says how a case runs and what it must show).

CI runs a fixed sample that covers every flag, every key and every kind of file with every
corruption (two hostile values per flag, one per key, the values rotating so that each is used);
CLR_HOSTILE_LONG=1 runs every hostile value on every flag and key, every campaign that has the
key, every file with every corruption and every reader, plus CLR_HOSTILE_EXAMPLES (default 10)
values per flag and key that Hypothesis generates (numbers of every size, text) and shrinks.
"""
import json
import os
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import hostilelib as hl

LONG = bool(os.environ.get("CLR_HOSTILE_LONG"))
SEED = 21  # the sample's seed (issue 21)
URL = "sqlite:///s.db"  # relative: every case runs in its own copy of the workspace
D = ["--data-dir", "{data}", "--n-val", "20"]
TINY_TRAIN = ["--n-s", "5", "--cycles", "1", "--n-batch", "20", "--eval-train-samples", "20"]

# command -> {variant: (options, positionals)}: a valid run of it on the workspace, to which a
# case adds its one hostile flag.
BASES = {
    "pipeline": {"": (["--config", "tiny.toml", "--campaign", "new", "--storage", URL, *D,
                       "--workers", "1"], [])},
    "phase": {
        "coarse": (["--config", "tiny.toml", "--campaign", "new", "--storage", URL, *D], ["coarse"]),
        "fine": (["--config", "tiny.toml", "--campaign", "half", "--storage", URL, *D], ["fine"]),
    },
    "confirm": {"": (["--config", "tiny.toml", "--campaign", "nearly", "--storage", URL, *D], [])},
    "status": {"": (["--config", "tiny.toml", "--campaign", "hg", "--storage", URL], [])},
    "retire": {"": (["--config", "tiny.toml", "--campaign", "hg", "--storage", URL], ["fine"])},
    "final": {"": (["--config", "tiny.toml", "--campaign", "hg", "--storage", URL, *D,
                    "--workers", "1"], [])},
    "dashboard": {"": (["--config", "tiny.toml", "--campaign", "hg", "--storage", URL], [])},
    "train": {"": ([*D, *TINY_TRAIN, "--out", "run"], [])},
    "gradcheck": {"": (D, [])},
    "bench": {"": ([*D, "--quick"], [])},
    "storage-proxy": {"": (["--storage", URL, "--port", "{port}"], [])},
}
# The commands that read each kind of file back (the argv of a valid run).
PIPELINE_HG = ["pipeline", "--config", "tiny.toml", "--storage", URL, *D, "--workers", "1"]
FINAL_HG = ["final", "--config", "tiny.toml", "--campaign", "hg", "--storage", URL, *D,
            "--workers", "1"]
DASHBOARD_HG = ["dashboard", "--config", "tiny.toml", "--campaign", "hg", "--storage", URL]
STATUS_HG = ["status", "--config", "tiny.toml", "--campaign", "hg", "--storage", URL]
READERS = {
    "results": [DASHBOARD_HG, FINAL_HG, PIPELINE_HG],
    "artifacts": [[*FINAL_HG, "--out", "elsewhere"], [*DASHBOARD_HG, "--serve", "--port", "{port}"]],
    "cache": [["train", *D, *TINY_TRAIN, "--out", "run"], ["gradcheck", *D], FINAL_HG],
    "s.db": [STATUS_HG, DASHBOARD_HG, FINAL_HG, PIPELINE_HG,
             ["phase", "fine", "--config", "tiny.toml", "--campaign", "half", "--storage", URL, *D]],
    "tiny.toml": [PIPELINE_HG, STATUS_HG, FINAL_HG, DASHBOARD_HG,
                  ["phase", "coarse", "--config", "tiny.toml", "--campaign", "new",
                   "--storage", URL, *D]],
    "checkpoint": [[*hl.CHECKPOINT_RUN, "--storage", URL, *D]],
}
CORRUPTIONS = ("truncated", "empty", "wrong-type", "fifo", "directory")

TALLY = Counter()  # outcome -> cases (printed at the end: the suite's closing figure)


# ---- the generated cases -----------------------------------------------------------------------

def _rotation(n, k, salt):
    """k hostile value names for the n-th item: every value used, in a seeded order."""
    names = list(hl.HOSTILE)
    random.Random(f"{SEED}-{salt}").shuffle(names)
    return [names[(n * k + i) % len(names)] for i in range(k)]


def flag_items():
    items = []
    for command in hl.commands():
        for variant in BASES[command]:
            for flag in hl.flags(command):
                items.append((command, variant, flag))
    return items


FLAG_ITEMS = flag_items()
KEYS = hl.campaign_keys()


def _id(command, variant, flag):
    return f"{command}{':' + variant if variant else ''} {flag.option}"


def corrupt(path, how):
    """Break the file at path in one way."""
    if how == "fifo" or how == "directory":
        path.unlink()
        os.mkfifo(path) if how == "fifo" else path.mkdir()
        return
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # wrong-type: a JSON file holds another type; anything else, other bytes
        path.write_bytes(b'["a list"]\n' if path.suffix == ".json" or raw[:1] in b"{["
                         else bytes(255 - b for b in raw[:64]) + raw[64:])


# ---- the workspace and running a case ----------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, cifar_tiny_dir):
    ws = hl.Workspace(tmp_path_factory.mktemp("hostile"), cifar_tiny_dir)
    with hl.stubs(rendering=LONG):
        ws.prepare()
        yield ws
    line = (f"hostile-generated ({'long' if LONG else 'CI sample'}): {sum(TALLY.values())} cases: "
            + ", ".join(f"{n} {k}" for k, n in sorted(TALLY.items())))
    sys.__stderr__.write(f"\n{line}\n")
    if os.environ.get("CLR_HOSTILE_TALLY"):
        Path(os.environ["CLR_HOSTILE_TALLY"]).write_text(json.dumps(dict(TALLY)) + "\n")


def expand(argv, ws, folder):
    return [a.replace("{data}", str(ws.data)).replace("{port}", str(hl.free_port()))
            for a in argv]


def run_case(ws, folder, argv, names, kind):
    argv = expand(argv, ws, folder)
    before = hl.snapshot(folder)
    code, out, err = hl.run_inprocess(argv, folder)
    after = hl.snapshot(folder)
    broke = hl.verdict(code, err, names, before, after)
    TALLY[f"exit {code}" if broke is None else "broken"] += 1
    if os.environ.get("CLR_HOSTILE_TALLY"):  # kept up to date: a long run may be stopped
        Path(os.environ["CLR_HOSTILE_TALLY"]).write_text(json.dumps(dict(TALLY)) + "\n")
    if broke is None:
        shutil.rmtree(folder, ignore_errors=True)
    elif os.environ.get("CLR_HOSTILE_FAILURES"):  # one line per broken case, for a long run
        with open(os.environ["CLR_HOSTILE_FAILURES"], "a") as f:
            f.write(f"{kind}: {broke[:400]}\n")
    assert broke is None, f"{kind}: clr-search {' '.join(a[:80] for a in argv)}: {broke}"


def flag_argv(command, variant, flag, value):
    options, positionals = BASES[command][variant]
    options, positionals = list(options), list(positionals)
    if flag.positional:
        index = [a.dest for a in hl.command_parser(command)._actions
                 if not a.option_strings].index(flag.dest) - len(_before(command))
        positionals = positionals[:index] + [value]
    elif flag.takes_value:
        options.append(f"{flag.option}={value}")
    else:
        options.append(flag.option)
    return [command, *positionals, *options]


def _before(command):
    from clr_lambda_search.search.cli.command import COMMANDS

    return COMMANDS[command][1]


# ---- Hypothesis: the sample's values are explicit examples, the long run generates more ---------

GENERATED = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
            max_size=40),
)


def hypothesis_test(values):
    """@given(value=…) over the hostile table's names (explicit examples) and, in the long run,
    generated raw values."""
    def wrap(fn):
        strategy = st.one_of(st.sampled_from(list(hl.HOSTILE)), GENERATED)
        test = given(value=strategy)(fn)
        for v in values:
            test = example(value=v)(test)
        return settings(
            database=None, deadline=None, derandomize=True,
            max_examples=int(os.environ.get("CLR_HOSTILE_EXAMPLES", 10)) if LONG else 1,
            phases=[Phase.explicit, Phase.generate, Phase.shrink] if LONG else [Phase.explicit],
            suppress_health_check=list(HealthCheck))(test)
    return wrap


def _text(value, folder):
    return hl.HOSTILE[value](folder) if value in hl.HOSTILE else value


@pytest.mark.parametrize(
    "item", [pytest.param(it, id=_id(*it)) for it in FLAG_ITEMS])
def test_flag(workspace, item):
    command, variant, flag = item
    n = FLAG_ITEMS.index(item)
    values = list(hl.HOSTILE) if LONG else _rotation(n, 2, "flags")
    if not flag.takes_value:
        values = values[:1]  # a switch takes no value: one case

    @hypothesis_test(values)
    def check(value):
        folder = workspace.case_dir()
        text = _text(value, folder)
        names = flag.names | ({text} if value in hl.PATH_VALUES or flag.text else set())
        run_case(workspace, folder, flag_argv(command, variant, flag, text), names,
                 f"flag {_id(*item)} = {value}")
    check()


def has_set(command):
    return any(f.option == "--set" for f in hl.flags(command))


def key_runner(key, config):
    """The cheapest command that takes --set and runs what key configures: one phase, the
    confirm phase or the final run once those commands have --set, else the whole pipeline."""
    common = ["--config", config, "--storage", URL, *D]
    if config == "tiny.toml" and has_set("phase"):
        if key.startswith("phases.fine."):
            return ["phase", "fine", *common, "--campaign", "half"]
        if key.startswith("phases.confirm.") and has_set("confirm"):
            return ["confirm", *common, "--campaign", "nearly"]
        if key.startswith("final.") and has_set("final"):
            return ["final", *common, "--campaign", "hg", "--workers", "1"]
        if not key.startswith(("phases.", "final.")) or key.startswith("phases.coarse."):
            return ["phase", "coarse", *common, "--campaign", "new"]
    return ["pipeline", *common, "--campaign", "new", "--workers", "1"]


def key_items():
    from clr_lambda_search.search.campaign import shipped

    items = []
    for key, campaigns in KEYS.items():
        items.append((key, "tiny.toml"))
        if LONG:
            items += [(key, c) for c in campaigns if c in shipped()]
    return items


KEY_ITEMS = key_items()


@pytest.mark.parametrize("item", [pytest.param(it, id=f"{it[0]} ({it[1]})") for it in KEY_ITEMS])
def test_key(workspace, item):
    key, config = item
    values = list(hl.HOSTILE) if LONG else _rotation(KEY_ITEMS.index(item), 1, "keys")
    tiny = []
    if config != "tiny.toml":
        from clr_lambda_search.search.campaign import load_campaign

        tiny = [a for pair in hl.tiny_overrides(load_campaign(config)) for a in ("--set", pair)]

    @hypothesis_test(values)
    def check(value):
        folder = workspace.case_dir()
        text = _text(value, folder)
        argv = [*key_runner(key, config), *tiny, "--set", f"{key}={text}"]
        last = key.rsplit(".", 1)[-1]  # a TrainConfig check names its field: "m=…", "n_s = …"
        names = {key, f"{last}=", f"{last} =", f"--{last.replace('_', '-')}"} | (
            {text} if value in hl.PATH_VALUES else set())
        run_case(workspace, folder, argv, names, f"key {key} = {value} in {config}")
    check()


def file_items(ws_files):
    items, rng = [], random.Random(SEED)
    for group, files in sorted(ws_files.items()):
        readers = READERS[group]
        for i, how in enumerate(CORRUPTIONS):
            if LONG:
                items += [(group, f, how, r) for f in files for r in range(len(readers))]
            else:
                items.append((group, rng.choice(files), how, i % len(readers)))
    return items


def test_files(workspace):
    """Every file read back, corrupted: one case per (file, corruption, reader) of the sample."""
    failures = []
    for group, rel, how, reader in file_items(workspace.files()):
        folder = workspace.case_dir()
        corrupt(folder / rel, how)
        parent = str(Path(rel).parent)
        names = {rel, Path(rel).name if Path(rel).name != "s.db" else rel,
                 *([parent] if parent not in (".", "studies/hg/final") else []),
                 "studies/hg/final" if parent == "studies/hg/final" else rel}
        try:
            run_case(workspace, folder, READERS[group][reader], names,
                     f"file {rel} {how}, read by {READERS[group][reader][0]}")
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_every_flag_and_key_is_sampled():
    """The sample covers every flag of every command, every campaign key and every value."""
    assert {(c, f.option) for c, _, f in FLAG_ITEMS} == {
        (c, f.option) for c in hl.commands() for f in hl.flags(c)}
    assert {k for k, _ in KEY_ITEMS} == set(KEYS)
    used = {v for n in range(len(FLAG_ITEMS)) for v in _rotation(n, 2, "flags")}
    assert used == set(hl.HOSTILE)


SUBPROCESS_CASES = [  # (command, flag option, hostile value): a few, of several commands
    ("train", "--lam", "nan"), ("phase", "--config", "fifo"), ("status", "--storage", "storage-file"),
    ("dashboard", "--final-dir", "5000-chars"), ("gradcheck", "--seed", "10**30"),
]


@pytest.mark.parametrize("command, option, value", SUBPROCESS_CASES)
def test_a_real_process_agrees(workspace, command, option, value):
    """A handful of cases run as real processes too (`python -m clr_lambda_search`): the same
    exit status and the same one error line as in-process, and the workspace unchanged."""
    import subprocess

    variant = next(iter(BASES[command]))
    flag = next(f for f in hl.flags(command) if f.option == option)
    lines = {}
    for how in ("in-process", "process"):
        folder = workspace.case_dir()
        argv = expand(flag_argv(command, variant, flag, _text(value, folder)), workspace, folder)
        before = hl.snapshot(folder)
        if how == "in-process":
            code, _, err = hl.run_inprocess(argv, folder)
        else:
            env = {k: v for k, v in os.environ.items() if k != "CIFAR10_DIR"}
            done = subprocess.run([sys.executable, "-m", "clr_lambda_search", *argv], cwd=folder,
                                  env={**env, "CIFAR10_CACHE": str(folder / "cache")},
                                  capture_output=True, text=True, timeout=hl.CASE_TIMEOUT)
            code, err = done.returncode, done.stderr
        assert code == 2, f"{how}: {argv}: exit {code}: {err[-500:]}"
        assert hl.verdict(code, err, flag.names | {_text(value, folder)[:40]}, before,
                          hl.snapshot(folder)) is None
        lines[how] = err.strip().replace(str(folder), "<case>")
    assert lines["in-process"] == lines["process"]
