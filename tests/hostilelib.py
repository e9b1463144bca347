"""The generated hostile-input suite's machinery (tests/test_hostile_generated.py).

The cases are not written by hand: they come from the interfaces themselves.
- flags: every option and positional of every command of `clr-search` (search/cli/command.py
  COMMANDS), read from the argparse parser each command's parse_args builds (captured, not
  copied), crossed with HOSTILE, the table of hostile values; a switch is a case of its own;
- keys: every dotted setting of every shipped campaign (search.settings.keys), given with
  `pipeline --set KEY=VALUE`, crossed with the same table;
- files: every file a finished tiny campaign leaves (results folder, artifacts, the array
  cache, the storage, the campaign file, a final seed's checkpoint) corrupted in every way of
  CORRUPTIONS, then read back by the commands that read it.

A case runs in-process (command.main through search.cli.errors.run, as the console script
does; sys.argv, stdout, stderr and the cwd swapped, SIGALRM for a hang) in its own copy of a
prepared workspace, with the work that never ends on its own stubbed out (the servers'
serve-forever loops, bench's measurements). It passes when it exits 0, or exits 2 with exactly
one line on stderr that starts with "error:", names the flag, key or file (or the hostile path
it was given), is at most MAX_LINE characters long, and the workspace is byte for byte as it was.
"""
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import threading
from pathlib import Path
from unittest import mock

LONG_VALUE = "x" * 5000
MAX_LINE = 1000    # characters of the one error line: a 5,000-character value is not echoed whole
CASE_TIMEOUT = 120  # seconds: a tiny case that takes longer hangs

# The hostile values: name -> the argv text, given the case folder (paths inside it).
HOSTILE = {
    "nan": lambda ws: "nan",
    "inf": lambda ws: "inf",
    "-inf": lambda ws: "-inf",
    "-1": lambda ws: "-1",
    "0": lambda ws: "0",
    "1e400": lambda ws: "1e400",
    "10**30": lambda ws: str(10**30),
    "empty": lambda ws: "",
    "5000-chars": lambda ws: LONG_VALUE,
    "directory": lambda ws: str(ws / "a-folder"),
    "storage-file": lambda ws: str(ws / "s.db"),
    "fifo": lambda ws: str(ws / "a-fifo"),
}
PATH_VALUES = ("directory", "storage-file", "fifo")

# The tiny campaign every case runs (the dd2424 protocol, scaled down to seconds).
TINY_TOML = """\
name = "hg"
seed = 0
[search]
n_s = 5
cycles = 1
n_batch = 20
evals_per_cycle = 2
eval_train_samples = 20
[[phases]]
name = "coarse"
n_trials = 3
sampler = "random"
pruner = "median"
params.lam = { low = 1e-5, high = 1e-1, log = true }
[[phases]]
name = "fine"
n_trials = 2
sampler = "tpe"
pruner = "median"
narrow = { from = "coarse", top_k = 2, margin = 0.25 }
[[phases]]
name = "confirm"
kind = "confirm"
top_k = 2
seeds = 2
[final]
seeds = 1
n_s = 5
cycles = 1
n_batch = 20
eval_train_samples = 20
"""


def tiny_overrides(campaign):
    """--set pairs that scale any shipped campaign down to the tiny data and seconds."""
    pairs = {"search.n_s": 5, "search.cycles": 1, "search.n_batch": 20,
             "search.eval_train_samples": 20, "search.m": 10, "final.seeds": 1, "final.n_s": 5,
             "final.cycles": 1, "final.n_batch": 20, "final.eval_train_samples": 20,
             "final.m": 10}
    for p in campaign.phases:
        if "n_trials" in p.settings:
            pairs[f"phases.{p.name}.n_trials"] = 3 if not getattr(p, "narrow", None) else 2
        if getattr(p, "narrow", None):
            pairs[f"phases.{p.name}.narrow.top_k"] = 2
        if "seeds" in p.settings:
            pairs[f"phases.{p.name}.seeds"] = 2
            pairs[f"phases.{p.name}.top_k"] = 2
    return [f"{k}={v}" for k, v in pairs.items()]


# The final run whose seed's checkpoint the workspace holds (ck/final.checkpoints/seed0.npz).
CHECKPOINT_RUN = ["final", "--config", "tiny.toml", "--campaign", "ck", "--lam", "0.01",
                  "--workers", "1", "--out", "ck/final"]


# ---- the parsers -------------------------------------------------------------------------------

class _Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


@dataclasses.dataclass(frozen=True)
class Flag:
    command: str
    option: str         # "--lam", or the positional's dest
    dest: str
    takes_value: bool   # False: a switch
    positional: bool = False
    text: bool = False  # takes any text (no type): an error may name the value instead

    @property
    def names(self):
        """What an error about this flag may call it: itself, or the campaign keys it is a
        shortcut of (an error after the overrides names the key)."""
        return {self.option, self.dest, self.dest.replace("_", "-"), self.dest.replace("-", "_"),
                self.dest.replace("_", ".", 1), *shortcut_keys(self.command, self.dest)}


@functools.lru_cache(maxsize=None)
def shortcut_keys(command, dest):
    """The campaign keys flag `dest` of `command` sets, found by its module's overrides(args,
    campaign) (the pipeline's flags are shortcuts of --set), else none."""
    import argparse
    import importlib

    from clr_lambda_search.search.campaign import load_campaign
    from clr_lambda_search.search.cli import command as cmd

    program = importlib.import_module(f"clr_lambda_search.search.cli.{cmd.COMMANDS[command][0]}")
    if not hasattr(program, "overrides"):
        return set()
    parser = command_parser(command)
    defaults = argparse.Namespace(**{a.dest: a.default for a in parser._actions})
    c = load_campaign("dd2424")
    try:
        before = program.overrides(defaults, c)
        setattr(defaults, dest, 1)
        return set(program.overrides(defaults, c)) - set(before)
    except Exception:  # not a value this flag takes: no keys
        return set()


@functools.lru_cache(maxsize=None)
def command_parser(name):
    """The argparse parser command `name` builds (captured from its parse_args)."""
    import importlib

    from clr_lambda_search.search.cli import command
    from clr_lambda_search.search.cli.args import Parser

    module, before, _ = command.COMMANDS[name]
    program = importlib.import_module(f"clr_lambda_search.search.cli.{module}")

    def capture(self, args=None, namespace=None):
        raise _Captured(self)
    with mock.patch.object(Parser, "parse_args", capture):
        try:
            program.parse_args(list(before))
        except _Captured as c:
            return c.parser
    raise AssertionError(f"{name}: parse_args built no Parser")


def flags(name):
    """Every flag and positional of command `name` (but --help, and the positionals the
    command fixes itself)."""
    import argparse

    from clr_lambda_search.search.cli import command

    fixed = len(command.COMMANDS[name][1])
    out, positionals = [], 0
    for action in command_parser(name)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            positionals += 1
            if positionals > fixed:
                out.append(Flag(name, action.dest, action.dest, True, positional=True,
                                text=True))
            continue
        switch = action.nargs == 0
        for option in action.option_strings if switch else [max(action.option_strings, key=len)]:
            out.append(Flag(name, option, action.dest, not switch,
                            text=not switch and action.type not in (int, float)))
    return out


def commands():
    from clr_lambda_search.search.cli import command

    return list(command.COMMANDS)


def campaign_keys():
    """{key: [shipped campaigns that have it]} over every shipped campaign."""
    from clr_lambda_search.search import settings
    from clr_lambda_search.search.campaign import load_campaign, shipped

    out = {}
    for name in shipped():
        for key in settings.keys(load_campaign(name)):
            out.setdefault(key, []).append(name)
    return out


# ---- the workspace -----------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """A prepared folder: tiny CIFAR-10 (outside it), its array cache, and one storage holding
    campaign hg finished (results folder, artifacts, dashboard), campaign half (coarse only),
    campaign nearly (coarse and fine), and a final seed's checkpoint of campaign ck."""

    def __init__(self, root, tiny_cifar):
        self.root = Path(root)
        self.template = self.root / "template"
        self.data = tiny_cifar.batches
        self.count = 0

    def url(self, folder):
        return f"sqlite:///{folder}/s.db"

    def prepare(self):
        t = self.template
        t.mkdir(parents=True)
        (t / "tiny.toml").write_text(TINY_TOML)
        d = ["--data-dir", str(self.data), "--n-val", "20"]
        steps = [
            ["pipeline", "--config", "tiny.toml", "--storage", self.url(t), *d, "--workers", "1"],
            ["phase", "coarse", "--config", "tiny.toml", "--campaign", "half",
             "--storage", self.url(t), *d],
            ["phase", "coarse", "--config", "tiny.toml", "--campaign", "nearly",
             "--storage", self.url(t), *d],
            ["phase", "fine", "--config", "tiny.toml", "--campaign", "nearly",
             "--storage", self.url(t), *d],
        ]
        for argv in steps:
            code, _, err = run_inprocess(argv, t)
            assert code == 0, f"preparing {argv}: exit {code}: {err}"
        self._checkpoint(t, d)
        (t / "a-folder").mkdir()
        (t / "a-folder" / "keep.txt").write_text("a user's file\n")

    def _checkpoint(self, t, d):
        """ck/final.checkpoints/seed0.npz: the state a final run of campaign ck (--lam 0.01)
        killed after its seed's last cycle leaves; the reader's run resumes from it."""
        import dataclasses as dc

        from clr_lambda_search.model.dataset import load_cifar10
        from clr_lambda_search.search.cli import final as final_cli
        from clr_lambda_search.search.final import train_seed

        cwd = os.getcwd()
        os.chdir(t)
        try:
            args = final_cli.parse_args(CHECKPOINT_RUN[1:] + ["--storage", self.url(t), *d])
            c, _ = final_cli.build_campaign(args)
            data = load_cifar10(self.data, n_val=20, cache_dir=t / "cache")
            config = c.final.training_config(c, {"lam": 0.01}, len(data.train.y))
            state = t / "ck" / "final.checkpoints" / "seed0.npz"
            state.parent.mkdir(parents=True)
            train_seed(data, dc.replace(config, seed=0), checkpoint=state)
        finally:
            os.chdir(cwd)
        assert state.is_file()

    def case_dir(self):
        """A fresh copy of the template (its own storage, cache and results)."""
        self.count += 1
        folder = self.root / f"case{self.count}"
        shutil.copytree(self.template, folder, symlinks=True)
        os.mkfifo(folder / "a-fifo")
        return folder

    def files(self):
        """Every file the template holds that the project reads back: {group: [relative path]}."""
        groups = {}
        for path in sorted(self.template.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.template)
            parts = rel.parts
            if rel.suffix in (".png", ".svg", ".html") or parts[0] == "a-folder":
                continue  # written for people, never read back
            group = ("cache" if parts[0] == "cache" else "artifacts" if "artifacts" in parts
                     else "checkpoint" if "final.checkpoints" in parts
                     else "results" if "final" in parts else rel.name)
            groups.setdefault(group, []).append(str(rel))
        return groups


# ---- running a case ----------------------------------------------------------------------------

class CaseTimeout(BaseException):
    """Raised by SIGALRM in a case that runs past CASE_TIMEOUT (not an Exception: the command's
    own handlers must not take it for a bug)."""


def _alarm(signum, frame):
    raise CaseTimeout()


ENGINES = []  # the SQLAlchemy engines a case created: disposed after it (no descriptor leak)


@contextlib.contextmanager
def stubs(rendering=True):
    """The long work of the commands that never end on their own: serving, benchmarking; with
    rendering=False also the drawing of figures and pages from valid data (matplotlib's savefig
    writes a placeholder, plotly's to_html an empty figure div): the sample's seconds."""
    import socketserver

    import sqlalchemy

    from clr_lambda_search.search import plots
    from clr_lambda_search.search.cli import bench, storage_proxy

    def create_engine(*args, **kwargs):
        engine = original_engine(*args, **kwargs)
        ENGINES.append(engine)
        return engine
    original_engine = sqlalchemy.engine.create_engine

    def serve_once(rdb, host, port, interval, ready=None, stop=None):
        stop = threading.Event()
        return original_serve(rdb, host, port, interval,
                              ready=lambda: (ready and ready(), stop.set()), stop=stop)
    original_serve = storage_proxy.serve
    figures = {"floor_ms": 1.0, "eval_ms": 1.0, "trial_s": 1.0}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(socketserver.BaseServer, "serve_forever",
                                              lambda self, *a, **k: None))
        stack.enter_context(mock.patch.object(storage_proxy, "serve", serve_once))
        for name in dir(bench):
            if name.startswith("measure_"):
                stack.enter_context(mock.patch.object(bench, name,
                                                      lambda *a, **k: dict(figures)))
        stack.enter_context(mock.patch.object(sqlalchemy.engine, "create_engine", create_engine))
        if not rendering:
            import matplotlib.figure

            stack.enter_context(mock.patch.object(matplotlib.figure.Figure, "savefig",
                                                  _placeholder_figure))
            stack.enter_context(mock.patch.object(
                plots.pio, "to_html", lambda *a, **k: '<div class="plotly-graph-div"></div>'))
            stack.enter_context(mock.patch.object(plots, "get_plotlyjs", lambda: ""))
        yield


def _placeholder_figure(self, fname, *args, **kwargs):
    if isinstance(fname, (str, os.PathLike)):
        Path(fname).write_bytes(b"figure\n")
    else:
        fname.write(b"figure\n")


def dispose_engines():
    while ENGINES:
        ENGINES.pop().dispose()


def run_inprocess(argv, cwd, env=None, timeout=CASE_TIMEOUT):
    """(exit code or "timeout", stdout, stderr) of `clr-search *argv` run in this process with
    cwd as its working directory, through the console script's error handling."""
    from clr_lambda_search.search.cli import command
    from clr_lambda_search.search.cli.errors import run

    out, err = io.StringIO(), io.StringIO()
    saved = (sys.stdout, sys.stderr, sys.argv, os.getcwd(), dict(os.environ),
             {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)})
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = []
    # the case's own array cache; no $CIFAR10_DIR (an empty --data-dir must not find one)
    os.environ.pop("CIFAR10_DIR", None)
    os.environ["CIFAR10_CACHE"] = str(Path(cwd) / "cache")
    os.environ.update(env or {})
    code = None
    try:
        os.chdir(cwd)
        sys.stdout, sys.stderr = out, err
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            run(lambda: command.main(argv))
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        except CaseTimeout:
            code = "timeout"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr, sys.argv = saved[:3]
        os.chdir(saved[3])
        os.environ.clear()
        os.environ.update(saved[4])
        for s, h in saved[5].items():
            signal.signal(s, h)
        for h in root.handlers:
            h.close()
        root.handlers = handlers
        dispose_engines()
    return code, out.getvalue(), err.getvalue()


def snapshot(folder):
    """{relative path: what it is}: kind, mode, and for a file its size, mtime and sha256; an
    SQLite storage by its content (its SQL dump, the -wal file's included: SQLite's own -wal and
    -shm files come and go with its connections)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if name.endswith((".db-wal", ".db-shm")):
                continue
            st = path.lstat()
            entry = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777)
            if stat.S_ISREG(st.st_mode) and name.endswith(".db"):
                entry += (_sqlite_content(path),)
            elif stat.S_ISREG(st.st_mode):
                entry += (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            out[str(path.relative_to(folder))] = entry
    return out


def _sqlite_content(path):
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
    except sqlite3.DatabaseError:  # not an SQLite file (a case corrupted it): its bytes
        return hashlib.sha256(path.read_bytes()).hexdigest()


def diff(before, after):
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return changed[:10]


def verdict(code, err, names, before, after):
    """None when the case kept the promise, else what broke it."""
    if code == 0:
        return None
    if code == "timeout":
        return f"hang: no exit within {CASE_TIMEOUT} s"
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 2:
        return f"exit {code}: {' | '.join(lines)[:2000]}"
    if len(lines) != 1 or not lines[0].startswith("error:"):
        return f"exit 2 but stderr is not one 'error:' line: {err[:2000]!r}"
    if len(lines[0]) > MAX_LINE:
        return f"exit 2 but its line has {len(lines[0])} characters: {lines[0][:300]!r}…"
    low = lines[0].lower()
    # fail() shortens long values; a message may quote a value by its repr (escapes)
    names = {m[:40] if len(m) >= 200 else m for n in names for m in (n, repr(n)[1:-1])}
    if not any(n and n.lower() in low for n in names):
        return f"exit 2 but the line names none of {sorted(names)}: {lines[0]!r}"
    changed = diff(before, after)
    if changed:
        return f"exit 2 but it wrote {changed}: {lines[0]!r}"
    return None
