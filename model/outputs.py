"""Where results may be written: the project never deletes or overwrites what it did not create.

A results folder (train.py's run, the final run) is published whole: written into a hidden
temporary sibling, given a manifest naming every file in it, then swapped in. An existing folder at
that path is replaced only when it is one of ours: its manifest says so and it holds nothing the
manifest does not list, or it is a results folder of an earlier release (config.json and
metrics.json beside nothing but the files this project writes). A dashboard page is replaced only
when it is one of ours (its generator tag, or the title earlier releases wrote). No output may be,
or contain, a protected path (the study storage). Temporaries left by a killed run are removed by
the next run that writes beside them, once the process that made them is gone.
"""
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from clr_lambda_search.model.errors import InputError

MANIFEST = ".clr-results.json"
TOOL = "clr-lambda-search"
PAGE_TAG = f'<meta name="generator" content="{TOOL}">'
_LEGACY_PAGE_TITLE = "<title>λ search — "
# What a results folder of an earlier release (no manifest) may hold.
_LEGACY_FILES = re.compile(r"(config|metrics)\.json|params(_seed\d+)?\.npz|history(_seed\d+)?\.json"
                           r"|(cost|loss|accuracy|lr)\.png")
_FIX = "choose another --out (a new or empty folder), or move it away"


def check_results_dir(path, protect=()):
    """InputError unless publish_dir may write the results folder `path`: it does not exist, is
    empty, or is a results folder of ours holding nothing else; and it neither is nor contains a
    `protect`ed path. Touches nothing."""
    path = Path(path)
    _check_parents(path)
    _check_protected(path, protect)
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"output path {path} is a file; pass a folder path with --out")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    foreign = _foreign_entries(path, entries)
    if foreign is None:
        raise InputError(f"output folder {path} exists and is not a results folder of this "
                         f"project (it holds {_names(entries)}); {_FIX}")
    if foreign:
        raise InputError(f"results folder {path} holds {_names(foreign)}, which this project did "
                         f"not write: replacing the folder would delete it; {_FIX}")


def _foreign_entries(path, entries):
    """The entries of a results folder that it does not own; None if it is no results folder."""
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            record = json.loads(manifest.read_text())
            owned = set(record["files"]) if record.get("tool") == TOOL else None
        except (OSError, ValueError, KeyError, TypeError):
            owned = None
        if owned is None:
            return None
        return [e for e in entries if e != MANIFEST and e not in owned]
    if not {"config.json", "metrics.json"} <= set(entries):
        return None
    return [e for e in entries if not _LEGACY_FILES.fullmatch(e)]


def _names(entries, most=3):
    shown = ", ".join(entries[:most])
    return shown + (f" and {len(entries) - most} more" if len(entries) > most else "")


def _check_parents(path):
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"output path {path} lies under the file {parent}; choose another --out")


def _check_protected(path, protect):
    target = path.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == target:
            raise InputError(f"output path {path} is the study storage; choose another --out")
        if target in p.parents:
            raise InputError(f"output path {path} contains the study storage {p}; choose another "
                             "--out")


def publish_dir(path, write, protect=()):
    """Call write(tmp_folder), then put tmp_folder at path, replacing a results folder of ours.

    A crash inside write leaves path as it was: never a half-written results folder. The folder
    gets a manifest of its files. If path became foreign while write ran, the results go to a new
    sibling folder instead and InputError says where.
    """
    path = Path(path)
    check_results_dir(path, protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "tmp"), dir=path.parent))
    try:
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"tool": TOOL, "files": files}, indent=1) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
        try:
            check_results_dir(path, protect)  # again: the folder may have changed meanwhile
        except InputError as e:
            aside = path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(tmp, aside)
            raise InputError(f"{e} (the results were saved to {aside} instead)") from None
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_in(tmp, path):
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "old"), dir=path.parent))
    try:
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old / path.name, path)  # put the previous results back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def check_page(path, protect=()):
    """InputError unless a dashboard page may be written at `path`: new, or a page of ours."""
    path = Path(path)
    _check_parents(path)
    _check_protected(path, protect)
    if path.is_dir():
        raise InputError(f"--out {path} is a folder; name an .html file")
    if path.exists() and not is_page(path):
        raise InputError(f"{path} exists and is not a dashboard page of this project; replacing it "
                         "would destroy it: choose another --out")


def is_page(path):
    """Whether the file at path is a dashboard page this project wrote (now or earlier)."""
    if not Path(path).is_file():  # a FIFO would block the read: not a page
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return PAGE_TAG in head or _LEGACY_PAGE_TITLE in head


def clean_stale(path):
    """Remove the temporaries that a killed run left beside `path` (folders and files named
    .<name>.tmp-… or .<name>.old-…) whose process is gone; earlier releases' (no pid) too."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(p(\d+)-)?.+")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or (match.group(3) and _alive(int(match.group(3)))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def temp_prefix(path, kind):
    return f".{Path(path).name}.{kind}-p{os.getpid()}-"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
