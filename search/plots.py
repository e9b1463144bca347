"""Figures of a campaign as plotly objects, and the self-contained dashboard page built from them.

Every text on the page that comes from a storage, a file or the command line is escaped: in the
page's markup (_esc, _num) and inside the figures (_escape_figure), whose titles, names and hover
texts plotly renders as HTML. Anyone who can write to a shared storage can write a trial's attrs.
"""
import functools
import html
import logging
import re

import numpy as np
import optuna.visualization as ov
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from model.curves import curve
from model.outputs import PAGE_TAG
from model.schedule import cyclic_lr
from search.report import param_names, space_text, study_report
from search.space import format_params

log = logging.getLogger(__name__)


def study_figures(study):
    """[(title, go.Figure)] for a study, from Optuna's figures: the optimization history, a slice
    per parameter (on a log axis where the parameter is log), intermediate values, EDF and
    timeline; with two parameters or more also the contour, parallel-coordinate and importance
    figures. (Titles hold parameter names from the storage: _Page escapes every figure.)"""
    names = param_names(study, study.get_trials(deepcopy=False))
    makers = [("Optimization history", ov.plot_optimization_history)]
    makers += [(f"Validation accuracy over {name}", functools.partial(ov.plot_slice, params=[name]))
               for name in names]
    if len(names) >= 2:
        makers += [("Contour", ov.plot_contour), ("Parallel coordinates", ov.plot_parallel_coordinate),
                   ("Parameter importances", ov.plot_param_importances)]
    makers += [("Intermediate values (half-cycle reports)", ov.plot_intermediate_values),
               ("Empirical distribution of validation accuracy", ov.plot_edf),
               ("Timeline", ov.plot_timeline)]
    figs = []
    for title, make in makers:
        fig = _figure(make, study)
        if fig is not None:
            fig.update_layout(title=title, height=380, margin=dict(l=60, r=20, t=50, b=50))
            figs.append((title, fig))
    return figs


def _figure(make, study):
    """make(study), or None when Optuna cannot draw it for this study (e.g. the importances of a
    study with fewer than two complete trials)."""
    try:
        return make(study)
    except (ValueError, RuntimeError) as e:
        log.info("figure %s skipped: %s", getattr(make, "__name__", make), e)
        return None


def curve_figures(history, config):
    """[(title, go.Figure)] of a training run: accuracy, loss, cost (train and val) and η."""
    figs = []
    for metric, title in (("acc", "Accuracy"), ("loss", "Loss"), ("cost", "Cost")):
        fig = go.Figure()
        for split in ("train", "val"):
            steps, values = curve(history, split, metric)
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=split))
        fig.update_layout(title=title, xaxis_title="update step", yaxis_title=metric, height=340)
        figs.append((title, fig))
    t = list(range(0, 2 * config["n_s"] * config["cycles"] + 1, max(1, config["n_s"] // 50)))
    eta = [cyclic_lr(s, config["eta_min"], config["eta_max"], config["n_s"]) for s in t]
    fig = go.Figure([go.Scatter(x=t, y=eta, mode="lines", name="η")])
    fig.update_layout(title="Cyclical learning rate η", xaxis_title="update step", height=340)
    figs.append(("η", fig))
    return figs


def _esc(x):
    """Any value as text safe inside HTML markup and attributes."""
    return html.escape(str(x), quote=True)


def _num(x, spec):
    """A number formatted with spec; anything else (a storage may hold any JSON) escaped as text."""
    if x is None:
        return ""
    if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
        return format(x, spec)
    return _esc(x)


# The pseudo-HTML tags plotly's own figures use (Optuna's hover texts break lines with <br>): they
# are put back after escaping. A hostile string can only make text bold or break a line with them.
_PLOTLY_TAGS = re.compile(r"&lt;(/?(?:br|b|i|sup|sub|extra)|br ?/)&gt;")


def _escape_text(s):
    return _PLOTLY_TAGS.sub(r"<\1>", html.escape(s, quote=False))


def _escape_strings(obj):
    if isinstance(obj, str):
        return _escape_text(obj)
    if isinstance(obj, dict):
        return {k: _escape_strings(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_escape_strings(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "OUS":
        return [_escape_strings(v) for v in obj.tolist()]
    return obj


def _escape_figure(fig):
    """The figure as a dict whose every string (titles, names, hover texts, tick and category
    labels) is escaped: plotly draws them as pseudo-HTML."""
    return _escape_strings(fig.to_dict())


def _table(rep):
    names = rep["params"]
    head = ("<tr><th>#</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names)
            + "<th>state</th><th>val acc</th><th>± std</th><th>val loss</th>"
            "<th>train acc</th><th>seconds</th><th>note</th></tr>")
    rows = []
    for r in rep["trials"]:
        note = f"retry of #{r['retry_of']}" if r["retry_of"] is not None else (r["failure"] or "")
        rows.append(f"<tr><td>{_esc(r['number'])}</td>"
                    + "".join(f"<td>{_value(r['params'].get(n))}</td>" for n in names)
                    + f"<td>{_esc(r['state'])}</td><td>{_num(r['val_acc'], '.4f')}</td>"
                    f"<td>{_num(r['val_acc_std'], '.4f')}</td><td>{_num(r['val_loss'], '.4f')}</td>"
                    f"<td>{_num(r['train_acc'], '.4f')}</td><td>{_num(r['seconds'], '.1f')}</td>"
                    f"<td>{_esc(note)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _value(x):
    """A parameter's value in a table cell: floats in scientific notation, the rest as text."""
    return _num(x, ".3e") if isinstance(x, float) else ("" if x is None else _esc(x))


class _Page:
    """Collects a part of the page; figure ids carry the part's prefix, so that parts rendered
    separately and in any order never share one. plotly.js is not in the parts: it goes once into
    the page's head (Dashboard.html)."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.parts = []
        self.n_figs = 0

    def text(self, markup):
        self.parts.append(markup)

    def figures(self, figs):
        self.parts.append('<div class="grid">')
        for _, fig in figs:
            self.parts.append(pio.to_html(_escape_figure(fig), full_html=False,
                                          include_plotlyjs=False, validate=False,
                                          div_id=f"{self.prefix}{self.n_figs}",
                                          config={"responsive": True}))
            self.n_figs += 1
        self.parts.append("</div>")


def study_section(page, study):
    rep = study_report(study)
    page.text(f"<h2>{_esc(rep['name'])}</h2>")
    best = rep["best"]
    which = "confirmed" if best and best["number"] is None else f"trial #{_esc(best and best['number'])}"
    page.text(f"<p>{_esc(rep['n_complete'])} complete trials in {_esc(space_text(rep['space']))}"
              + (f"; best {_esc(format_params(best['params']))} ({which}), "
                 f"validation accuracy {_num(best['val_acc'], '.4f')}" if best else "") + "</p>")
    confirm = rep.get("confirm")
    if confirm and confirm["sentence"]:
        page.text(f"<p class=verdict><b>Verdict:</b> {_esc(confirm['sentence'])} — the interval "
                  "covers seed noise on the one fixed validation set.</p>")
    n = rep["narrowed"]
    if isinstance(n, dict):
        page.text(f"<p class=range>Narrowed from {_esc(n.get('from_study'))} trials "
                  f"{_esc(n.get('from_trials'))}: {_esc(n.get('rule'))}</p>")
    for warning in rep["warnings"]:
        page.text(f"<p class=warn>Warning: {_esc(warning)}</p>")
    page.figures(study_figures(study))
    page.text(_table(rep))


def final_section(page, final):
    """final: {"metrics", "config", "history"} of the final run, read by the caller."""
    m = final["metrics"]
    seeds = ", ".join(f"seed {_esc(s['seed'])}: {_num(s['test_acc'], '.4f')}" for s in m["seeds"])
    src = m["source"]
    where = f"{src['study']} trial #{src['trial']}" if src.get("study") else "given on the command line"
    params = m.get("params")  # a results folder of the releases before campaign files has none
    page.text(f"<h2>Final run</h2><p class=final>"
              f"{_esc(format_params(params)) if isinstance(params, dict) else ''} ({_esc(where)}); "
              f"test accuracy <b>{_num(m['test_acc_mean'], '.4f')} ± "
              f"{_num(m['test_acc_std'], '.4f')}</b> ({seeds}); {_esc(final['config']['cycles'])} "
              f"cycle(s) of n_s = {_esc(final['config']['n_s'])}</p>")
    page.figures(curve_figures(final["history"], final["config"]))


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:8px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.warn{color:#b00}.final{font-size:1.2em}"""
_PLOTLY_CONFIG = "window.PlotlyConfig = {MathJaxConfig: 'local'};"  # as plotly's own to_html has it


class Dashboard:
    """The dashboard page of a campaign, rendered in two parts: the studies' sections when it is
    made, the final run's section by html(). The studies' part does not depend on the final run:
    the pipeline makes its Dashboard while the final run's last seed trains and a CPU is free."""

    def __init__(self, campaign, storage_label, studies):
        self.header = (f"<h1>Hyperparameter search — campaign {_esc(campaign)}</h1>"
                       f"<p>storage {_esc(storage_label)}</p>")
        self.campaign = campaign
        page = _Page("study-fig")
        for study in studies:
            study_section(page, study)
        self.studies_part = page.parts

    def html(self, final=None):
        """The whole page as one HTML string (plotly.js inlined: opens offline)."""
        page = _Page("final-fig")
        if final:
            final_section(page, final)
        body = "\n".join([self.header, *page.parts, *self.studies_part])
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{PAGE_TAG}<title>search — "
                f"{_esc(self.campaign)}</title><style>{_STYLE}</style>"
                f"<script>{_PLOTLY_CONFIG}</script><script>{get_plotlyjs()}</script></head>"
                f"<body>{body}</body></html>")


def dashboard_html(campaign, storage_label, studies, final=None):
    """The whole dashboard page as one HTML string (plotly.js inlined: opens offline)."""
    return Dashboard(campaign, storage_label, studies).html(final)
