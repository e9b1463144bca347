"""Training configuration, evaluation and the mini-batch GD loop with a cyclical learning rate."""
import dataclasses
import logging
import numbers
import shutil
import zipfile
from pathlib import Path

import numpy as np

from clr_lambda_search.model.checkpoint import load_training_state, save_training_state
from clr_lambda_search.model.batch_files import K
from clr_lambda_search.model.errors import ConfigError, DivergedError
from clr_lambda_search.model.layers import softmax
from clr_lambda_search.model.network import init_params, l2_penalty, scores
from clr_lambda_search.model.precision import PRECISIONS, resolve_precision
from clr_lambda_search.model.resources import check_memory
from clr_lambda_search.model.schedule import cyclic_lr
from clr_lambda_search.model.step import (IMAGE_D, StepParams, batch_source, can_augment,
                                          draw_noise, make_workspace, sgd_step)

log = logging.getLogger(__name__)
DTYPES = ("float32", "float64")
# Seeds are 32-bit: Optuna's samplers seed numpy's RandomState, which refuses 2**32 and above, and
# one range for every seed keeps a training seed usable as a sampler seed and back.
SEED_LIMIT = 2**32
# More updates than any run makes (10^10 at ~1 ms each is four months): a bigger n_s or cycles is
# a typo, and would otherwise train forever.
MAX_UPDATES = 10**10
# λ and η_max far past any value that trains (the protocol's: λ ≈ 1e-3, η_max 0.1; such runs
# diverge at once, which the divergence tests rely on), yet not 1e30: every bound is finite.
MAX_LAM = 1e6
MAX_ETA = 1e6


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the report's final protocol (n_s 980, 3 cycles)."""

    lam: float = 0.01                 # L2 strength λ: cost = loss + λ(‖W1‖² + ‖W2‖²)
    m: int = 50                       # hidden units
    n_batch: int = 100                # samples per update
    eta_min: float = 1e-5             # CLR lower bound
    eta_max: float = 1e-1             # CLR upper bound
    n_s: int = 980                    # CLR half cycle, in updates
    cycles: int = 3                   # training stops at the end of the last cycle
    evals_per_cycle: int = 10         # evaluation points per cycle (plus one at step 0)
    eval_train_samples: int = 10_000  # train metrics on this fixed prefix of the train split
    seed: int = 0                     # init and shuffling
    dtype: str = "float32"            # float32 (fast) or float64 (gradient-check precision)
    # Regularisers beyond the report's protocol, off by default (the base runs are bit-identical
    # to the ones before they existed). Their random draws come from the run's rng (model.step).
    dropout: float = 0.0              # inverted dropout of the hidden units in training, p in [0, 1)
    flip: bool = False                # flip each training image left-right with probability 1/2
    shift: int = 0                    # translate each training image by up to this many pixels
    # The two large products (X_b W1, X_bᵀ dH) in fp32, in bf16 (fp32 accumulation and master
    # weights; needs bf16 instructions and MKL or oneDNN) or "auto" (bf16 where it pays:
    # model.precision)
    precision: str = "fp32"

    @property
    def augment(self):
        """Whether training images are moved (flipped or translated) as they are gathered."""
        return self.flip or self.shift > 0

    def __post_init__(self):
        for name, ok, fix in _CHECKS:
            if not ok(self):
                raise ConfigError(f"{name} = {getattr(self, name.split()[0])!r} is invalid: {fix}")

    @property
    def total_steps(self):
        """Updates to the end of the last cycle: 2·n_s·cycles."""
        return 2 * self.n_s * self.cycles

    def eval_steps(self):
        """The sorted update steps at which train and val are evaluated (0 and the end included)."""
        per_cycle = 2 * self.n_s
        points = {round(k * per_cycle / self.evals_per_cycle)
                  for k in range(self.cycles * self.evals_per_cycle + 1)}
        return sorted(points)


def _finite(x):
    """A finite real number (an int too big for a float, a string or None is not)."""
    try:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(float(x))
    except OverflowError:
        return False


def _whole(x):
    """An integer (a float such as 77.2, or a bool, is not a count of units, updates or cycles)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


_CHECKS = [
    ("lam", lambda c: _finite(c.lam) and 0 <= c.lam <= MAX_LAM,
     f"λ must lie in [0, {MAX_LAM:g}] (e.g. --lam 0.01)"),
    ("m", lambda c: _whole(c.m) and c.m > 0, "the hidden layer needs a whole number ≥ 1 of units"),
    ("n_batch", lambda c: _whole(c.n_batch) and c.n_batch > 0,
     "use a whole positive batch size (e.g. 100)"),
    ("eta_min", lambda c: c.eta_min > 0, "η_min must be > 0 (e.g. 1e-5)"),
    ("eta_max", lambda c: _finite(c.eta_max) and c.eta_min <= c.eta_max <= MAX_ETA,
     f"η_max must be ≥ η_min and at most {MAX_ETA:g} (e.g. --eta-min 1e-5 --eta-max 0.1)"),
    ("n_s", lambda c: _whole(c.n_s) and 0 < c.n_s <= MAX_UPDATES // 2,
     f"the CLR half cycle must be a whole positive number of updates, 2·n_s at most {MAX_UPDATES:.0e}"),
    ("cycles", lambda c: _whole(c.cycles) and c.cycles > 0 and (
        not _whole(c.n_s) or 2 * c.n_s * c.cycles <= MAX_UPDATES),
     f"train a whole number ≥ 1 of cycles, 2·n_s·cycles at most {MAX_UPDATES:.0e} updates"),
    ("evals_per_cycle", lambda c: 0 < c.evals_per_cycle <= 2 * c.n_s,
     "evaluate at least once per cycle and at most once per update (≤ 2·n_s)"),
    ("eval_train_samples", lambda c: c.eval_train_samples >= 0, "use 0 or more samples"),
    ("seed", lambda c: 0 <= c.seed < SEED_LIMIT, f"seeds are integers in 0..{SEED_LIMIT - 1}"),
    ("dtype", lambda c: c.dtype in DTYPES, f"choose one of {', '.join(DTYPES)}"),
    ("dropout", lambda c: 0 <= c.dropout < 1,
     "the probability of dropping a hidden unit lies in [0, 1) (e.g. --dropout 0.3; 0: none)"),
    ("flip", lambda c: c.flip in (True, False), "flip is True or False (--flip / --no-flip)"),
    ("shift", lambda c: isinstance(c.shift, (int, np.integer)) and 0 <= c.shift < 32,
     "translations of a 32-pixel image lie in 0..31 pixels (e.g. --shift 3; 0: none)"),
    ("precision", lambda c: c.precision in PRECISIONS, f"choose one of {', '.join(PRECISIONS)}"),
    ("precision with dtype", lambda c: c.precision == "fp32" or c.dtype == "float32",
     "bf16 products keep float32 master weights: use dtype float32 or precision fp32"),
]


def evaluate(params, X, y, lam, block=8192):
    """Loss (mean cross-entropy), cost (loss + L2) and accuracy of params on X (N, D), y (N,).

    Works in blocks of rows so that memory stays small on the full training set.
    """
    total_nll, correct = 0.0, 0
    for start in range(0, len(y), block):
        Xb, yb = X[start:start + block], y[start:start + block]
        H = np.maximum(Xb @ params["W1"] + params["b1"], 0)
        S = (H @ params["W2"] + params["b2"]).astype(np.float64)
        S -= S.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(S).sum(axis=1))
        total_nll += float(np.sum(log_z - S[np.arange(len(yb)), yb]))
        correct += int(np.sum(S.argmax(axis=1) == yb))
    loss = total_nll / len(y)
    return {"loss": loss, "cost": loss + l2_penalty(params, lam), "acc": correct / len(y)}


def evaluate_ensemble(snapshots, X, y, block=8192):
    """Loss and accuracy of an ensemble of params (a snapshot ensemble: fit(snapshots=True)) on X
    (N, D), y (N,): the mean of the members' softmax probabilities, in float64. Its loss is the
    cross-entropy of those mean probabilities; there is no cost (the members' L2 terms differ)."""
    total_nll, correct = 0.0, 0
    for start in range(0, len(y), block):
        Xb, yb = X[start:start + block], y[start:start + block]
        P = sum(softmax(scores(p, Xb).astype(np.float64)) for p in snapshots) / len(snapshots)
        total_nll -= float(np.sum(np.log(np.maximum(P[np.arange(len(yb)), yb], 1e-300))))
        correct += int(np.sum(P.argmax(axis=1) == yb))
    return {"loss": total_nll / len(y), "acc": correct / len(y), "members": len(snapshots)}


def fit(data, config, on_eval=None, train_curve=True, snapshots=False, checkpoint=None):
    """Train fresh params on data with config -> (params, history), or with snapshots=True
    (params, history, snapshots): copies of the params at the end of every cycle (the CLR's
    minimum; the last one equals params), for evaluate_ensemble.

    One np.random.default_rng(config.seed) draws the init and then shuffles every epoch (and draws
    dropout masks and augmentation moves, when config asks for them), so one config gives
    bit-identical params and history.
    checkpoint: None, or a file path: the run's state is written there atomically at every cycle
      end, and a run that finds a state of the same config, train_curve and snapshots there
      resumes from it, with bit-identical results to a run never interrupted (another state is
      logged and overwritten). The caller deletes the file once it has the results.
    """
    # a ConfigError now, not a MemoryError at the first allocation
    check_memory(config, data.train.X.shape[1], len(data.train.y))
    rng = np.random.default_rng(config.seed)
    kept = [] if snapshots else None
    params = _initial_params(data, config, rng)
    resume = None
    if checkpoint is not None:
        key = _checkpoint_key(config, train_curve, snapshots)
        resume = _resumable(checkpoint, key, params, rng, kept)
        checkpoint = (Path(checkpoint), key)
    params, history = train(params, data, config, rng, on_eval, train_curve, kept,
                            checkpoint=checkpoint, resume=resume)
    return (params, history, kept) if snapshots else (params, history)


def _initial_params(data, config, rng):
    return init_params(data.train.X.shape[1], config.m, K, rng, dtype=np.dtype(config.dtype))


def _checkpoint_key(config, train_curve, snapshots):
    """What a saved state must match to be resumed: everything that shapes the run's results,
    the precision "auto" resolves to on this machine included."""
    return {"config": dataclasses.asdict(config), "train_curve": bool(train_curve),
            "snapshots": bool(snapshots), "precision": resolve_precision(config.precision)[0],
            "format": 1}


def _resumable(path, key, params, rng, kept):
    """The loop state saved in path, with params, rng and kept (the snapshots) set from it; None
    (a fresh start, logged) when there is none or it belongs to another run."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO would block the read, a folder the save: our file, replaced
        log.warning("checkpoint %s is not a regular file; removed, starting afresh", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    try:
        saved, snapshots, meta = load_training_state(path)
        if meta["key"] != key:
            log.info("checkpoint %s is of another run; starting afresh (it will be overwritten)",
                     path)
            return None
        state = {"t": int(meta["step"]), "epoch": int(meta["epoch"]), "pos": int(meta["pos"]),
                 "perm": meta["arrays"]["perm"], "history": meta["history"]}
        for k, v in saved.items():  # all checked before anything is set: no half-resumed run
            if v.shape != params[k].shape or v.dtype != params[k].dtype:
                raise ValueError(f"{k} has another shape or dtype")
        rng.bit_generator.state = meta["rng"]  # the last thing that can fail
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        log.warning("checkpoint %s is unreadable (%s); starting afresh", path, e)
        return None
    for k, v in saved.items():
        params[k][...] = v
    if kept is not None:
        kept.extend(snapshots)
    log.info("resuming from checkpoint %s at step %d", path, state["t"])
    return state


def warm_up(data, config):
    """Compile the step's kernels for these data and config now (numba also caches them on disk):
    processes forked afterwards inherit them instead of each compiling its own (~3 s the first
    time, a load from the cache later), dropout's, augmentation's and bf16's too when config has
    them. Trains one throwaway step; data is left unchanged. Raises ConfigError as train() would
    for augmentation these data cannot take or a precision this machine cannot run (before any
    process is forked)."""
    params = StepParams(_initial_params(data, config, np.random.default_rng(0)))
    _check_augmentation(data, config, params["W1"].dtype)
    precision, _ = resolve_precision(config.precision)
    ws = make_workspace(1, data.train.X.shape[1], config.m, K, params["W1"].dtype,
                        config.dropout, config.flip, config.shift, precision)
    try:
        sgd_step(params, data.train.X, data.train.y, np.arange(1), config.eta_min, config.lam, ws,
                 data.train.pixels)
    except DivergedError:
        pass  # compiled all the same; the real runs will report it


def train(params, data, config, rng, on_eval=None, train_curve=True, snapshots=None,
          checkpoint=None, resume=None):
    """Mini-batch GD with a triangular CLR from step 0 to config.total_steps, params updated in place.

    Args:
      params: dict W1, b1, W2, b2 (see network.init_params).
      data: object with .train and .val, each with X (N, D) and y (N,).
      config: TrainConfig; its precision is resolved here (model.precision) and logged.
      rng: np.random.Generator that shuffles each epoch.
      on_eval: optional callable(record) called at every evaluation point; it may raise to stop
        (the search raises optuna.TrialPruned through it).
      train_curve: evaluate the train subset at every evaluation point (False: at the last one only,
        for a run whose curves nobody draws; the history's other records then have "train": None).
        The validation split is evaluated at every point either way.
      snapshots: None, or a list that receives a copy of params at the end of every cycle.
      checkpoint, resume: fit()'s (a (path, key) to save the state to at cycle ends; the loop
        state to continue from, params and rng already restored).
    Returns:
      (params, history): history is a list of records {step, lr, epoch, train: {...}, val: {...}}.
    Raises:
      DivergedError when the loss stops being finite; ConfigError when config asks for
      augmentation that these data cannot take or a precision this machine cannot run.
    """
    D = data.train.X.shape[1]
    _check_augmentation(data, config, params["W1"].dtype)
    precision, why = resolve_precision(config.precision)
    # said once per training only where "auto" chose (or bf16 runs slow here); fp32 as asked is quiet
    log.log(logging.DEBUG if why == f"{config.precision} requested" else logging.INFO,
            "precision %s (%s)", precision, why)
    ws = make_workspace(config.n_batch, D, config.m, params["b2"].shape[0], params["W1"].dtype,
                        config.dropout, config.flip, config.shift, precision)
    stepped = StepParams(params)  # the same arrays; reading W1 through it settles its decay
    try:
        history = _loop(stepped, data, config, rng, on_eval, train_curve, snapshots, ws,
                        checkpoint, resume)
    finally:
        stepped.settle()  # the caller's dict holds W1 itself, however training ended
    return params, history


def _loop(params, data, config, rng, on_eval, train_curve, snapshots, ws, checkpoint, resume):
    """train()'s loop: the updates, and at their evaluation points and cycle ends the history,
    the snapshots and the checkpoint; from step 0 or from `resume`."""
    eval_at = set(config.eval_steps())  # looked up after every step
    if resume:
        history = resume["history"]
        state = {k: resume[k] for k in ("t", "epoch", "pos", "perm")}
    else:
        history = [evaluation_record(params, data, config, 0, train_curve)]
        _report(history[-1], on_eval)
        state = None
    for state in updates(params, data, config, rng, ws, state):
        t = state["t"]
        if t in eval_at:
            history.append(evaluation_record(params, data, config, t, train_curve, state["epoch"]))
            _report(history[-1], on_eval)
        if t % (2 * config.n_s) == 0:  # a cycle's end
            if snapshots is not None:
                snapshots.append({k: v.copy() for k, v in params.items()})
            if checkpoint is not None:
                _save_state(checkpoint, params, snapshots, rng, history, state)
    return history


def updates(params, data, config, rng, ws, state=None):
    """The updates of training, one per iteration, up to config.total_steps: each epoch a fresh
    permutation from rng, walked in consecutive batches (the last, smaller one included), η from
    the schedule, the batch's noise drawn, one sgd_step. Yields the loop state {t (updates
    done), epoch, pos (the next batch's start in perm), perm} after each update (one dict,
    updated in place); state: such a dict to continue from (None: step 0).
    params: a model.step.StepParams; ws: its workspace for config (scripts/bench.py times this
    loop). Raises DivergedError naming the step."""
    X, pixels = batch_source(data.train.X, data.train.pixels, ws)
    y, N = data.train.y, len(data.train.y)
    state = state or {"t": 0, "epoch": 0, "pos": N, "perm": None}
    while state["t"] < config.total_steps:
        if state["pos"] >= N:  # an epoch starts
            state.update(perm=rng.permutation(N), pos=0, epoch=state["epoch"] + 1)
        t, pos = state["t"], state["pos"]
        idx = state["perm"][pos:pos + config.n_batch]
        draw_noise(ws, len(idx), rng)
        try:
            sgd_step(params, X, y, idx, cyclic_lr(t, config.eta_min, config.eta_max, config.n_s),
                     config.lam, ws, pixels)
        except DivergedError:
            raise DivergedError(_diverged_message(config, t + 1)) from None
        state["t"], state["pos"] = t + 1, pos + config.n_batch
        yield state


def _save_state(checkpoint, params, snapshots, rng, history, state):
    path, key = checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    save_training_state(path, params, snapshots, {
        "key": key, "step": state["t"], "epoch": state["epoch"], "pos": state["pos"],
        "rng": rng.bit_generator.state, "history": history, "arrays": {"perm": state["perm"]}})


def _check_augmentation(data, config, dtype):
    if config.augment and not can_augment(data.train.X, data.train.pixels, dtype):
        what = (f"rows of {data.train.X.shape[1]} values" if data.train.X.shape[1] != IMAGE_D
                else "no uint8 training pixels in the training dtype")
        raise ConfigError(f"flip = {config.flip!r}, shift = {config.shift!r} move the pixels of "
                          f"32×32 RGB images (rows of {IMAGE_D} uint8 pixels), but these data "
                          f"have {what}: train without --flip and --shift")


def evaluation_record(params, data, config, t, train_curve=True, epoch=0):
    """One evaluation point of training (scripts/bench.py times it): metrics at step t on the
    validation split and on the fixed train subset (at every point, or only at the last one when
    not train_curve: "train" is None where it was not measured)."""
    k = config.eval_train_samples or len(data.train.y)
    measure_train = train_curve or t == config.total_steps
    record = {
        "step": t,
        "epoch": epoch,
        "lr": cyclic_lr(t, config.eta_min, config.eta_max, config.n_s),
        "train": (evaluate(params, data.train.X[:k], data.train.y[:k], config.lam)
                  if measure_train else None),
        "val": evaluate(params, data.val.X, data.val.y, config.lam),
    }
    measured = [record[s] for s in ("train", "val") if record[s] is not None]
    if not all(np.isfinite(m[key]) for m in measured for key in ("loss", "cost")):
        raise DivergedError(_diverged_message(config, t))
    return record


def _report(record, on_eval):
    log.debug("step %d lr %.2e train acc %s val acc %.4f", record["step"], record["lr"],
              "-" if record["train"] is None else f"{record['train']['acc']:.4f}",
              record["val"]["acc"])
    if on_eval is not None:
        on_eval(record)


def _diverged_message(config, t):
    return (f"training diverged at step {t} (non-finite loss) with λ={config.lam:g}, "
            f"η_max={config.eta_max:g}: lower η_max or λ")

