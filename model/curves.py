"""The report's figures from a training history: cost, loss, accuracy (train and val) and η."""
import numpy as np
from matplotlib.figure import Figure

from clr_lambda_search.model.schedule import cyclic_lr

METRICS = ("cost", "loss", "acc")
_TITLES = {"cost": "Cost (loss + L2)", "loss": "Loss (cross-entropy)", "acc": "Accuracy"}
_YLABELS = {"cost": "cost (loss + λ‖W‖²)", "loss": "loss (cross-entropy)", "acc": "accuracy"}


def curve(history, split, metric):
    """(steps, values) of `metric` on `split` at the history's points where split was measured."""
    points = [(r["step"], r[split][metric]) for r in history if r[split] is not None]
    return [s for s, _ in points], [v for _, v in points]


def metric_figure(history, metric, title_suffix="", train_label="train"):
    """Train and val `metric` against update step; title_suffix: a second title line (the
    parameters the run trained)."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for split, style, label in (("train", "-o", train_label), ("val", "-s", "validation")):
        ax.plot(*curve(history, split, metric), style, ms=3, label=label)
    ax.set_xlabel("update step")
    ax.set_ylabel(_YLABELS[metric])
    ax.set_title(_TITLES[metric] + (f"\n{title_suffix}" if title_suffix else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def lr_figure(config, title_suffix=""):
    """η against update step over the whole run: a triangle wave, drawn through its corners (one
    point per half cycle, not per update: a long run's figure stays small)."""
    t = np.arange(0, config.total_steps + 1, config.n_s)
    eta = [cyclic_lr(int(s), config.eta_min, config.eta_max, config.n_s) for s in t]
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    ax.plot(t, eta)
    ax.set_xlabel("update step")
    ax.set_ylabel("learning rate η")
    ax.set_title(f"Cyclical learning rate (n_s = {config.n_s}, η {config.eta_min:.4g}–"
                 f"{config.eta_max:.4g})" + (f"\n{title_suffix}" if title_suffix else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def training_figures(history, config, title_suffix=""):
    """{file stem: Figure} for the run: cost, loss, accuracy and lr; every title ends with the
    line title_suffix (which names the parameters the run trained)."""
    n = config.eval_train_samples
    train = f"train ({n:,}-image subset)" if n else "train"
    figs = {m if m != "acc" else "accuracy": metric_figure(history, m, title_suffix, train)
            for m in METRICS}
    figs["lr"] = lr_figure(config, title_suffix)
    return figs
