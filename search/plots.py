"""Figures of a campaign as plotly objects, and the self-contained dashboard page built from them."""
import html

import optuna.visualization as ov
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from model.curves import curve
from model.schedule import cyclic_lr
from search.report import study_report

_STUDY_FIGURES = (
    ("Optimization history", ov.plot_optimization_history),
    ("Validation accuracy over λ", lambda s: ov.plot_slice(s, params=["lam"])),
    ("Intermediate values (half-cycle reports)", ov.plot_intermediate_values),
    ("Empirical distribution of validation accuracy", ov.plot_edf),
    ("Timeline", ov.plot_timeline),
)


def study_figures(study):
    """[(title, go.Figure)] for a study: history, slice over λ (log axis), intermediate values,
    EDF and timeline (Optuna's figures)."""
    figs = []
    for title, make in _STUDY_FIGURES:
        fig = make(study)
        fig.update_layout(title=title, height=380, margin=dict(l=60, r=20, t=50, b=50))
        figs.append((title, fig))
    return figs


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


def _table(rep):
    head = "<tr><th>#</th><th>λ</th><th>state</th><th>val acc</th><th>± std</th><th>val loss</th>" \
           "<th>train acc</th><th>seconds</th><th>note</th></tr>"

    def cell(x, spec):
        return "" if x is None else format(x, spec)
    rows = []
    for r in rep["trials"]:
        note = f"retry of #{r['retry_of']}" if r["retry_of"] is not None else (r["failure"] or "")
        rows.append(f"<tr><td>{r['number']}</td><td>{cell(r['lam'], '.3e')}</td><td>{r['state']}</td>"
                    f"<td>{cell(r['val_acc'], '.4f')}</td><td>{cell(r['val_acc_std'], '.4f')}</td>"
                    f"<td>{cell(r['val_loss'], '.4f')}</td><td>{cell(r['train_acc'], '.4f')}</td>"
                    f"<td>{cell(r['seconds'], '.1f')}</td><td>{html.escape(note)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


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
            self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False,
                                          div_id=f"{self.prefix}{self.n_figs}",
                                          config={"responsive": True}))
            self.n_figs += 1
        self.parts.append("</div>")


def study_section(page, study):
    rep = study_report(study)
    page.text(f"<h2>{html.escape(rep['name'])}</h2>")
    best = rep["best"]
    page.text(f"<p>{rep['n_complete']} complete trials"
              + (f"; best λ = {best['lam']:.4g} (trial #{best['number']}), validation accuracy "
                 f"{best['val_acc']:.4f}" if best else "") + "</p>")
    if rep["fine_range"]:
        fr = rep["fine_range"]
        page.text(f"<p class=range>Fine λ range [{fr['low']:.3g}, {fr['high']:.3g}] derived from "
                  f"{html.escape(fr['coarse_study'])} trials {fr['from_trials']}: "
                  f"{html.escape(fr['rule'])}</p>")
    if rep["warning"]:
        page.text(f"<p class=warn>Warning: {html.escape(rep['warning'])}</p>")
    page.figures(study_figures(study))
    page.text(_table(rep))


def final_section(page, final):
    """final: {"metrics", "config", "history"} of the final run, read by the caller."""
    m = final["metrics"]
    seeds = ", ".join(f"seed {s['seed']}: {s['test_acc']:.4f}" for s in m["seeds"])
    src = m["source"]
    where = f"{src['study']} trial #{src['trial']}" if src.get("study") else "given on the command line"
    page.text(f"<h2>Final run</h2><p class=final>λ = {m['lam']:.4g} ({html.escape(where)}); test "
              f"accuracy <b>{m['test_acc_mean']:.4f} ± {m['test_acc_std']:.4f}</b> ({seeds}); "
              f"{final['config']['cycles']} cycle(s) of n_s = {final['config']['n_s']}</p>")
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
        self.header = (f"<h1>λ search — campaign {html.escape(campaign)}</h1>"
                       f"<p>storage {html.escape(storage_label)}</p>")
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
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>λ search — "
                f"{html.escape(self.campaign)}</title><style>{_STYLE}</style>"
                f"<script>{_PLOTLY_CONFIG}</script><script>{get_plotlyjs()}</script></head>"
                f"<body>{body}</body></html>")


def dashboard_html(campaign, storage_label, studies, final=None):
    """The whole dashboard page as one HTML string (plotly.js inlined: opens offline)."""
    return Dashboard(campaign, storage_label, studies).html(final)
