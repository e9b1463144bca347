"""Saving results: params as .npz, everything else as JSON, each file written atomically."""
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

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
