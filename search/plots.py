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
from optuna.trial import TrialState
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from clr_lambda_search.model.curves import curve
from clr_lambda_search.model.errors import InputError
from clr_lambda_search.model.outputs import PAGE_TAG
from clr_lambda_search.model.schedule import cyclic_lr
from clr_lambda_search.search import record
from clr_lambda_search.search.report import param_names, phase_spec, study_report
from clr_lambda_search.search.study import STORAGE_LINE
from clr_lambda_search.search.space import format_params

log = logging.getLogger(__name__)


def searched(names):
    """The end of a figure's title: which parameters were searched (every title names them)."""
    return subtitle(f"searched: {', '.join(names)}") if names else ""


def subtitle(text):
    """A second, smaller title line (plotly's pseudo-HTML; text escaped by _Page with the rest)."""
    return f"<br><sup>{text}</sup>" if text else ""


def study_figures(study):
    """[(title, go.Figure)] for a study. A search phase: Optuna's figures, the optimization
    history, a slice per parameter (on a log axis where the parameter is log), intermediate
    values, EDF and timeline; with two parameters or more also the contour, parallel-coordinate
    and importance figures. A confirm phase: its own figures (confirm_figures) instead, Optuna's
    would show the history of the luckiest seed and importances over a handful of candidates.
    Every title ends with the searched parameters. (Titles hold parameter names from the
    storage: _Page escapes every figure.)"""
    if record.read(study).races:
        return confirm_figures(study)
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
            fig.update_layout(title=title + searched(names), height=380,
                              margin=dict(l=60, r=20, t=70, b=50))
            if title not in ("Empirical distribution of validation accuracy", "Timeline",
                             "Parameter importances", "Contour", "Parallel coordinates"):
                fig.update_yaxes(title_text="validation accuracy")  # not "Objective Value"
            figs.append((title, fig))
    return figs


_PHASE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def overview_figures(studies):
    """[(title, go.Figure)]: validation accuracy against each searched parameter with every
    phase overlaid in its colour (a confirm phase: each candidate's mean ± std over its seeds),
    on a log axis where a phase searched the parameter on a log scale."""
    names = list(dict.fromkeys(n for s in studies
                               for n in param_names(s, s.get_trials(deepcopy=False))))
    figs = []
    for name in names:
        fig = go.Figure()
        for colour, study in zip(_PHASE_COLOURS * 3, studies):
            x, y, err = _phase_points(study, name)
            if x:
                fig.add_trace(go.Scatter(x=x, y=y, mode="markers", name=study.study_name,
                                         marker=dict(color=colour, size=8),
                                         error_y=dict(type="data", array=err, visible=bool(err))))
        log_axis = any(p.get("name") == name and p.get("log") for s in studies
                       for p in (record.read(s).space or []) if isinstance(p, dict))
        fig.update_layout(title=f"Validation accuracy over {name}, every phase{searched(names)}",
                          height=380,
                          xaxis_title=name, yaxis_title="validation accuracy",
                          xaxis_type="log" if log_axis else None)
        figs.append((name, fig))
    return figs


def _phase_points(study, name):
    """(x, y, error bars or []) of a study's complete trials for parameter `name`; a confirm
    study: one point per candidate, its mean over the seeds ± their std."""
    rec = record.read(study)
    verdict = record.verdict(study)
    if verdict is not None:
        cands = rec.candidates or []
        points = [(c["params"].get(name), np.mean(verdict["scores"][str(i)]),
                   np.std(verdict["scores"][str(i)])) for i, c in enumerate(cands)
                  if str(i) in verdict["scores"] and verdict["scores"][str(i)]]
        points = [p for p in points if p[0] is not None]
        return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if name in t.params]
    return [t.params[name] for t in done], [t.value for t in done], []


def confirm_figures(study):
    """[(title, go.Figure)] of a confirm study: the paired differences to the pick with their
    interval (confirm_difference_figure) and each candidate's accuracy per seed
    (confirm_seeds_figure); [] before its race has a verdict."""
    rec = record.read(study)
    verdict = record.verdict(study)
    if verdict is None or not isinstance(rec.candidates, list):
        return []
    names = list(dict.fromkeys(n for c in rec.candidates for n in c.get("params", {})))
    scores = {int(c): list(s) for c, s in verdict.get("scores", {}).items()}
    labels = {i: format_params(c.get("params", {})) for i, c in enumerate(rec.candidates)}
    seeds = [f"seed {s}" for s in rec.seeds or []]
    return [confirm_difference_figure(scores, labels, seeds, verdict, names),
            confirm_seeds_figure(scores, labels, seeds, verdict.get("dropped", {}), names)]


def confirm_difference_figure(scores, labels, seeds, verdict, names):
    """(title, go.Figure): for every candidate but the pick, its paired difference to the pick
    in points of accuracy — one marker per seed (seeds as categories, one colour each) and the
    mean with its t interval — beside the line of no difference."""
    from clr_lambda_search.search.confirm import CONFIDENCE, paired_interval

    pick = verdict["pick"]
    others = [c for c in scores if c != pick and scores[c]]
    ys = [labels.get(c, str(c)) for c in others]
    fig = go.Figure()
    for k, seed in enumerate(seeds):
        xs = [100 * (scores[c][k] - scores[pick][k]) if k < min(len(scores[c]), len(scores[pick]))
              else None for c in others]
        if any(x is not None for x in xs):
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=seed,
                                     marker=dict(size=9, opacity=0.7)))
    means, halves = zip(*(paired_interval(scores[c], scores[pick]) for c in others)) \
        if others else ((), ())
    fig.add_trace(go.Scatter(
        x=[100 * m for m in means], y=ys, mode="markers", name=f"mean, {CONFIDENCE:.0%} CI",
        marker=dict(symbol="diamond", size=13, color="black"),
        error_x=dict(type="data", array=[100 * h if np.isfinite(h) else 0 for h in halves])))
    fig.add_vline(x=0, line_dash="dash", line_color="grey")
    title = f"Confirm phase: paired difference to the pick {labels.get(pick, pick)}"
    fig.update_layout(title=title + searched(names), height=380,
                      xaxis_title="candidate − pick, validation accuracy (points)",
                      yaxis=dict(type="category", title="candidate"))
    return title, fig


def confirm_seeds_figure(scores, labels, seeds, dropped, names):
    """(title, go.Figure): each candidate's validation accuracy on each paired seed (the seeds
    are categories, not numbers: there is no seed 1,000.5)."""
    fig = go.Figure()
    for c, values in scores.items():
        out = dropped.get(str(c))
        fig.add_trace(go.Scatter(
            x=seeds[:len(values)], y=values, mode="lines+markers",
            name=labels.get(c, str(c)) + (f" (dropped after {out} seeds)" if out else "")))
    title = "Confirm phase: validation accuracy per paired seed"
    fig.update_layout(title=title + searched(names), height=380,
                      xaxis=dict(type="category", title="training seed",
                                 categoryorder="array", categoryarray=seeds),
                      yaxis_title="validation accuracy")
    return title, fig


def _figure(make, study):
    """make(study), or None when Optuna cannot draw it for this study (e.g. the importances of a
    study with fewer than two complete trials)."""
    try:
        return make(study)
    except (ValueError, RuntimeError) as e:
        log.info("figure %s skipped: %s", getattr(make, "__name__", make), e)
        return None


def curve_figures(history, config, named=""):
    """[(title, go.Figure)] of a training run: accuracy, loss, cost (train and val) and η; every
    title ends with `named` (the parameters the run trained)."""
    suffix = subtitle(named)
    figs = []
    train = _train_label(config)
    for metric, title in (("acc", "Accuracy"), ("loss", "Loss"), ("cost", "Cost")):
        fig = go.Figure()
        for split, label in (("train", train), ("val", "validation")):
            steps, values = curve(history, split, metric)
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=label))
        fig.update_layout(title=title + suffix, xaxis_title="update step",
                          yaxis_title={"acc": "accuracy", "loss": "loss (cross-entropy)",
                                       "cost": "cost (loss + λ‖W‖²)"}[metric], height=340)
        figs.append((title, fig))
    t = list(range(0, 2 * config["n_s"] * config["cycles"] + 1, max(1, config["n_s"] // 50)))
    eta = [cyclic_lr(s, config["eta_min"], config["eta_max"], config["n_s"]) for s in t]
    fig = go.Figure([go.Scatter(x=t, y=eta, mode="lines", name="η")])
    fig.update_layout(title="Cyclical learning rate η" + suffix, xaxis_title="update step",
                      yaxis_title="learning rate η", height=340)
    figs.append(("η", fig))
    return figs


def _train_label(config):
    n = config.get("eval_train_samples") if isinstance(config, dict) else None
    return f"train ({n:,}-image subset)" if isinstance(n, int) and n > 0 else "train"


def seeds_band_figure(histories, config, named=""):
    """(title, go.Figure): the final seeds' validation accuracy as mean ± std over the seeds at
    each evaluation point, with the first seed's train-subset accuracy; the title ends with
    `named` (the parameters trained)."""
    curves = [curve(h, "val", "acc") for h in histories.values()]
    steps = curves[0][0]
    values = np.array([v for s, v in curves if s == steps])
    mean, std = values.mean(axis=0), values.std(axis=0)
    fig = go.Figure([
        go.Scatter(x=steps + steps[::-1], y=list(mean + std) + list((mean - std)[::-1]),
                   fill="toself", line=dict(width=0), fillcolor="rgba(255,127,14,0.25)",
                   name=f"validation, ± std over {len(values)} seeds", hoverinfo="skip"),
        go.Scatter(x=steps, y=list(mean), mode="lines", line=dict(color="#ff7f0e"),
                   name="validation, mean over the seeds")])
    first = next(iter(histories.values()))
    train_steps, train_acc = curve(first, "train", "acc")
    fig.add_trace(go.Scatter(x=train_steps, y=train_acc, mode="lines",
                             line=dict(color="#1f77b4"),
                             name=f"{_train_label(config)}, seed {next(iter(histories))}"))
    fig.update_layout(title="Final run: accuracy over the seeds" + subtitle(named),
                      xaxis_title="update step",
                      yaxis_title="accuracy", height=380)
    return "Final run: accuracy over the seeds", fig


def _seeds_table(metrics):
    """The final seeds' validation, test and snapshot-ensemble accuracies, with mean ± std."""
    rows = metrics.get("seeds") or []
    cols = [("val_acc", "validation"), ("test_acc", "test"),
            ("test_acc_ensemble", "test, snapshot ensemble")]
    cols = [(k, t) for k, t in cols if all(k in r for r in rows)]
    body = "".join("<tr><td>" + _esc(r.get("seed")) + "</td>"
                   + "".join(f"<td>{_num(r[k], '.4f')}</td>" for k, _ in cols) + "</tr>"
                   for r in rows)
    stats = "".join(f"<td>{_num(float(np.mean([r[k] for r in rows])), '.4f')} ± "
                    f"{_num(float(np.std([r[k] for r in rows])), '.4f')}</td>" for k, _ in cols
                    if all(isinstance(r[k], (int, float)) for r in rows))
    head = "<tr><th>seed</th>" + "".join(f"<th>{t}</th>" for _, t in cols) + "</tr>"
    return f"<table>{head}{body}<tr><th>mean ± std</th>{stats}</tr></table>"


def campaign_table(studies, final=None):
    """The resolved campaign in a short table: each phase's study, kind, trials, sampler,
    pruner, space (a confirm phase: its candidates and seeds) and protocol, then the final
    run's settings."""
    head = ("<tr><th>phase</th><th>kind</th><th>trials</th><th>sampler</th><th>pruner</th>"
            "<th>space</th><th>protocol</th></tr>")
    rows = []
    for s in studies:
        a = record.read(s)
        config = a.config if isinstance(a.config, dict) else {}
        protocol = ", ".join(f"{k} {_esc(config[k])}" for k in ("n_s", "cycles", "m", "n_batch")
                             if k in config)
        sampler, space = phase_spec(a)
        rows.append(f"<tr><td>{_esc(s.study_name)}</td><td>{_esc(a.kind)}</td>"
                    f"<td>{len(s.get_trials(deepcopy=False))}</td><td>{_esc(sampler)}</td>"
                    f"<td>{_esc(a.pruner)}</td><td class=spec>{_esc(space)}</td>"
                    f"<td>{protocol}</td></tr>")
    if final:
        c = final["config"]
        rows.append(f"<tr><td>final</td><td>final</td><td>{len(final['metrics']['seeds'])} seeds"
                    f"</td><td>—</td><td>—</td><td>{_esc(format_params(final['metrics'].get('params') or {}))}"
                    f"</td><td>n_s {_esc(c.get('n_s'))}, cycles {_esc(c.get('cycles'))}, m "
                    f"{_esc(c.get('m'))}</td></tr>")
    return f"<h2>The campaign</h2><table>{head}{''.join(rows)}</table>"


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
    page.text(f"<p>{_esc(rep['n_complete'])} complete trials in {_esc(rep['spec'])}"
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
    where = ("given on the command line" if not src.get("study") else
             f"{src['study']}, confirmed" if src.get("trial") is None else
             f"{src['study']} trial #{src['trial']}")
    params = m.get("params")  # a results folder of the releases before campaign files has none
    page.text(f"<h2>Final run</h2><p class=final>"
              f"{_esc(format_params(params)) if isinstance(params, dict) else ''} ({_esc(where)}); "
              f"test accuracy <b>{_num(m['test_acc_mean'], '.4f')} ± "
              f"{_num(m['test_acc_std'], '.4f')}</b> ({seeds}); {_esc(final['config']['cycles'])} "
              f"cycle(s) of n_s = {_esc(final['config']['n_s'])}</p>")
    page.text(_seeds_table(m))
    histories = final.get("histories") or {}
    named = format_params(params) if isinstance(params, dict) else ""
    first = f"{named}, seed {m['seeds'][0]['seed']}" if m.get("seeds") else named
    band = [seeds_band_figure(histories, final["config"], named)] if len(histories) > 1 else []
    page.figures(band + curve_figures(final["history"], final["config"], first))


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:8px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td.spec{text-align:left}.warn{color:#b00}.final{font-size:1.2em}"""
_PLOTLY_CONFIG = "window.PlotlyConfig = {MathJaxConfig: 'local'};"  # as plotly's own to_html has it


class Dashboard:
    """The dashboard page of a campaign, rendered in two parts: the studies' sections when it is
    made, the final run's section by html(). The studies' part does not depend on the final run:
    the pipeline makes its Dashboard while the final run's last seed trains and a CPU is free."""

    def __init__(self, campaign, storage_label, studies):
        self.header = (f"<h1>Hyperparameter search — campaign {_esc(campaign)}</h1>"
                       + STORAGE_LINE.format(_esc(storage_label)))
        self.campaign = campaign
        self.studies = studies
        page = _Page("study-fig")
        if studies:
            page.figures(overview_figures(studies))
        for study in studies:
            study_section(page, study)
        self.studies_part = page.parts

    def html(self, final=None):
        """The whole page as one HTML string (plotly.js inlined: opens offline)."""
        page = _Page("final-fig")
        try:  # the results folder is read back, untrusted: a value of the wrong shape is input
            if final:
                final_section(page, final)
            table = campaign_table(self.studies, final)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise InputError(f"the final results in {final.get('folder', 'the results folder')} "
                             f"hold a value of the wrong shape ({type(e).__name__}: "
                             f"{str(e)[:80]}); re-run scripts/final.py") from None
        summary = table + "".join(
            f"<p class=verdict><b>Verdict of {_esc(s.study_name)}:</b> "
            f"{_esc(record.verdict(s)['sentence'])} (seed noise on the one fixed "
            "validation set)</p>" for s in self.studies if record.verdict(s) is not None)
        body = "\n".join([self.header, summary, *page.parts, *self.studies_part])
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{PAGE_TAG}<title>search — "
                f"{_esc(self.campaign)}</title><style>{_STYLE}</style>"
                f"<script>{_PLOTLY_CONFIG}</script><script>{get_plotlyjs()}</script></head>"
                f"<body>{body}</body></html>")


def dashboard_html(campaign, storage_label, studies, final=None):
    """The whole dashboard page as one HTML string (plotly.js inlined: opens offline)."""
    return Dashboard(campaign, storage_label, studies).html(final)
