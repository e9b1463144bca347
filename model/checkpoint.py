"""Saving results: params as .npz, everything else as JSON, each file written atomically."""
import dataclasses
import io
import json
import os
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.network import PARAM_KEYS
from clr_lambda_search.model.outputs import check_page, clean_stale, current_umask, temp_prefix


def _atomic_write(path, write):
    """write(file) into a temporary sibling renamed over path: readers see the old or the new file."""
    path = Path(path)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_params(path, params):
    """params -> .npz with the keys W1, b1, W2, b2."""
    _atomic_write(path, lambda f: np.savez(f, **{k: params[k] for k in PARAM_KEYS}))


def read_regular(path):
    """The bytes of the regular file at path. Everything read back is untrusted: InputError naming
    the file when it is missing, unreadable, a directory or a FIFO (opened without blocking and
    refused, where a plain open() would wait forever for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror}); {_REWRITE}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file; {_REWRITE}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"cannot read {path} ({e.strerror}); {_REWRITE}") from None
    finally:
        os.close(fd)


_REWRITE = "delete it, or re-run the command that wrote it"


def load_params(path):
    """The parameters of a .npz file (W1, b1, W2, b2); InputError when it holds anything else."""
    data = read_regular(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in PARAM_KEYS}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path} is not a parameters file of this project ({e}); "
                         f"{_REWRITE}") from None


def save_json(path, obj):
    """Pretty JSON; numpy scalars become Python numbers."""
    save_text(path, json.dumps(obj, indent=2, default=_to_builtin) + "\n")


def save_text(path, text):
    """A text file (UTF-8), written atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path, kind=None):
    """The JSON value of a file (of type kind when given: dict, list); InputError naming the file
    when it is truncated, empty, not UTF-8, nested past the parser's depth or of another type."""
    data = read_regular(path)
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise InputError(f"{path} is not valid JSON ({str(e)[:100]}); {_REWRITE}") from None
    if kind is not None and not isinstance(value, kind):
        raise InputError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; "
                         f"{_REWRITE}")
    return value


def _to_builtin(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot save {type(x).__name__} as JSON")


def save_run(folder, config, metrics, runs, extra_config=None, named="λ"):
    """Write a results folder: config.json, metrics.json, per run params<tag>.npz and
    history<tag>.json, and the figures (cost, loss, accuracy, lr .png) of the first run.

    runs: list of (tag, params, history); tag "" for a single run, "_seed1" etc. for several.
    named: the parameters the run trained as the figures' titles name them (the searched
    ones, search.space.format_params; "λ" names config.lam), followed by the first run's seed.
    """
    from clr_lambda_search.model.curves import training_figures  # matplotlib: loaded only when figures are drawn

    save_json(folder / "config.json", {**dataclasses.asdict(config), **(extra_config or {})})
    save_json(folder / "metrics.json", metrics)
    for tag, params, history in runs:
        if params is not None:  # a final seed trained on a machine whose artifacts are not here
            save_params(folder / f"params{tag}.npz", params)
        save_json(folder / f"history{tag}.json", history)
    _, _, history = runs[0]
    named = f"lam={config.lam:.4g}" if named == "λ" else named
    suffix = f"{named}, seed {config.seed}"
    for name, fig in training_figures(history, config, suffix).items():
        for ext in ("png", "svg"):
            fig.savefig(folder / f"{name}.{ext}")


def save_page(path, text, protect=()):
    """Write a dashboard page (model.outputs.check_page first: never over a file not ours)."""
    check_page(path, protect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_text(path, text)


# ---- a training run's state, to resume it ----------------------------------------------------

def save_training_state(path, params, snapshots, meta):
    """One .npz, written atomically (a kill leaves the previous state or this one): params (as
    p_<key>), the snapshots so far (s<i>_<key>), and meta (JSON-able: the loop's position, the
    rng's state, the history...) as JSON text. Extra arrays go in meta["arrays"] (dict)."""
    arrays = {f"p_{k}": params[k] for k in PARAM_KEYS}
    for i, snap in enumerate(snapshots or ()):
        arrays.update({f"s{i}_{k}": snap[k] for k in PARAM_KEYS})
    extra = meta.pop("arrays", {})
    arrays.update({f"a_{k}": v for k, v in extra.items()})
    meta = {**meta, "snapshots": len(snapshots or ()), "array_names": sorted(extra)}
    arrays["meta"] = np.array(json.dumps(meta, default=_to_builtin))
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_training_state(path):
    """(params, snapshots, meta) of save_training_state, meta["arrays"] holding the extra arrays;
    OSError / ValueError / KeyError when the file is missing or damaged."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        params = {k: z[f"p_{k}"] for k in PARAM_KEYS}
        snapshots = [{k: z[f"s{i}_{k}"] for k in PARAM_KEYS} for i in range(meta["snapshots"])]
        meta["arrays"] = {k: z[f"a_{k}"] for k in meta["array_names"]}
    return params, snapshots, meta
