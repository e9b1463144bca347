"""Saving results: params as .npz, everything else as JSON, each file written atomically."""
import dataclasses
import json
import shutil
import os
import tempfile
from pathlib import Path

import numpy as np

from model.errors import InputError
from model.network import PARAM_KEYS


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_params(path, params):
    """params -> .npz with the keys W1, b1, W2, b2."""
    _atomic_write(path, lambda f: np.savez(f, **{k: params[k] for k in PARAM_KEYS}))


def load_params(path):
    with np.load(path) as z:
        return {k: z[k] for k in PARAM_KEYS}


def save_json(path, obj):
    """Pretty JSON; numpy scalars become Python numbers."""
    save_text(path, json.dumps(obj, indent=2, default=_to_builtin) + "\n")


def save_text(path, text):
    """A text file (UTF-8), written atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_json(path):
    return json.loads(Path(path).read_text())


def _to_builtin(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot save {type(x).__name__} as JSON")


def check_out_dir(path):
    """Refuse an output path that exists and is not a folder (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output path {path} is a file; pass a folder path with --out")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"output path {path} lies under the file {parent}; choose another --out")


def publish_dir(path, write):
    """Call write(tmp_folder), then put tmp_folder at path, replacing what was there.

    A crash inside write leaves path as it was: never a half-written results folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)  # put the previous results back
                raise
            finally:
                _rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _rmtree(tmp)
    return path


def _rmtree(p):
    shutil.rmtree(p, ignore_errors=True)


def save_run(folder, config, metrics, runs, extra_config=None):
    """Write a results folder: config.json, metrics.json, per run params<tag>.npz and
    history<tag>.json, and the figures (cost, loss, accuracy, lr .png) of the first run.

    runs: list of (tag, params, history); tag "" for a single run, "_seed1" etc. for several.
    """
    from model.curves import training_figures  # matplotlib: loaded only when figures are drawn

    save_json(folder / "config.json", {**dataclasses.asdict(config), **(extra_config or {})})
    save_json(folder / "metrics.json", metrics)
    for tag, params, history in runs:
        save_params(folder / f"params{tag}.npz", params)
        save_json(folder / f"history{tag}.json", history)
    _, _, history = runs[0]
    suffix = f" — λ={config.lam:.3g}" + (f", seed {config.seed}" if len(runs) > 1 else "")
    for name, fig in training_figures(history, config, suffix).items():
        fig.savefig(folder / f"{name}.png")
