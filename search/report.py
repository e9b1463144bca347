"""Tables and summaries of studies, as dicts (for --json) and as text (the report's tables)."""
import logging

from optuna.trial import TrialState

from search.runner import SURPLUS
from search.space import on_border, space_from_dict
from search.study import campaign_studies, finished_trials, retried_from

log = logging.getLogger(__name__)


def trial_row(t):
    """One trial as a plain dict."""
    attrs = t.user_attrs
    return {"number": t.number, "state": t.state.name, "lam": t.params.get("lam"),
            "val_acc": t.value if t.state == TrialState.COMPLETE else None,
            "val_acc_std": attrs.get("val_acc_std"), "val_loss": attrs.get("val_loss"),
            "train_acc": attrs.get("train_acc"), "seconds": attrs.get("seconds"),
            "retry_of": retried_from(t), "failure": attrs.get("failure") or _fail_reason(t)}


def _fail_reason(t):
    """Why a trial did not complete, when our attrs do not say."""
    if t.state == TrialState.FAIL:
        return "worker stopped (killed)"
    if t.state == TrialState.PRUNED and t.last_step is not None:
        return f"pruned at step {t.last_step} (val acc {t.intermediate_values[t.last_step]:.4f})"
    return None


def best_row(study):
    done = finished_trials(study)
    if not done:
        return None
    best = done[0]
    return {"number": best.number, "lam": best.params["lam"], "val_acc": best.value,
            "val_acc_std": best.user_attrs.get("val_acc_std")}


def border_warning(study, best):
    """A sentence when the best λ sits on a border of the searched range, else None."""
    lam_param = [p for p in space_from_dict(study.user_attrs.get("space", [])) if p.name == "lam"]
    if best is None or not lam_param or study.user_attrs.get("sampler") == "grid":
        return None
    p = lam_param[0]
    if on_border(best["lam"], p.low, p.high):
        widen = "--margin" if study.user_attrs.get("phase") == "fine" else "--low/--high"
        return (f"the best λ {best['lam']:.3g} lies on a border of [{p.low:.3g}, {p.high:.3g}]: "
                f"the optimum may be outside the range; widen {widen}")
    return None


def study_report(study):
    """The study as a dict; trials sorted best first. Surplus trials (bookkeeping of parallel
    workers that raced for the last slot, never trained) are counted, not listed."""
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: (t.state != TrialState.COMPLETE, -(t.value or 0), t.number))
    surplus = [t for t in trials if t.user_attrs.get("failure") == SURPLUS]
    trials = [t for t in trials if t.user_attrs.get("failure") != SURPLUS]
    best = best_row(study)
    return {"name": study.study_name, "best": best, "trials": [trial_row(t) for t in trials],
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_surplus": len(surplus),
            "repeats": study.user_attrs.get("repeats", 1),
            "fine_range": study.user_attrs.get("fine_range"),
            "warning": border_warning(study, best)}


def status_report(storage, campaign):
    """{"campaign", "studies": [study_report, ...]}; InputError for an unknown campaign."""
    return {"campaign": campaign,
            "studies": [study_report(s) for s in campaign_studies(storage, campaign)]}


def _fmt(x, spec):
    return format(x, spec) if x is not None else "—"


def study_text(rep):
    lines = [f"== {rep['name']}: {rep['n_complete']} complete trials"
             + (f", {rep['repeats']} seeds per λ" if rep["repeats"] > 1 else "")]
    if rep["fine_range"]:
        fr = rep["fine_range"]
        lines.append(f"   λ range [{fr['low']:.3g}, {fr['high']:.3g}] from coarse trials "
                     f"{fr['from_trials']} ({fr['rule']})")
    lines.append(f"   {'#':>4} {'λ':>10} {'state':>9} {'val acc':>16} {'val loss':>9} "
                 f"{'train acc':>9} {'s':>6}")
    for r in rep["trials"]:
        acc = _fmt(r["val_acc"], ".4f") + (f" ± {r['val_acc_std']:.4f}"
                                           if r["val_acc"] is not None and rep["repeats"] > 1 else "")
        note = f"retry of #{r['retry_of']}" if r["retry_of"] is not None else (r["failure"] or "")
        lines.append(f"   {r['number']:>4} {_fmt(r['lam'], '10.3e')} {r['state']:>9} {acc:>16} "
                     f"{_fmt(r['val_loss'], '9.4f')} {_fmt(r['train_acc'], '9.4f')} "
                     f"{_fmt(r['seconds'], '6.1f')} {note}".rstrip())
    if rep["best"]:
        b = rep["best"]
        lines.append(f"   best: #{b['number']} λ = {b['lam']:.4g}, val acc {b['val_acc']:.4f}")
    if rep["warning"]:
        lines.append(f"   warning: {rep['warning']}")
    return "\n".join(lines)


def status_text(report):
    return "\n\n".join(study_text(s) for s in report["studies"])


def phase_summary(study, spec, storage_label, seconds):
    best = best_row(study)
    warning = border_warning(study, best)
    if warning:
        log.warning(warning)
    return {"campaign": spec.campaign, "phase": spec.phase, "study": study.study_name,
            "storage": storage_label, "n_complete": len(finished_trials(study)),
            "n_trials": spec.n_trials, "best": best,
            "fine_range": study.user_attrs.get("fine_range"), "warning": warning,
            "seconds": round(seconds, 2)}


def summary_text(s):
    b = s["best"]
    head = (f"{s['study']}: {s['n_complete']} complete trials; best λ = {b['lam']:.4g} "
            f"(trial #{b['number']}), val acc {b['val_acc']:.4f}" if b else f"{s['study']}: no complete trial")
    extra = []
    if s["fine_range"]:
        extra.append(f"fine λ range [{s['fine_range']['low']:.3g}, {s['fine_range']['high']:.3g}] "
                     f"({s['fine_range']['rule']})")
    if s["warning"]:
        extra.append("warning: " + s["warning"])
    extra.append(f"storage {s['storage']}, {s['seconds']:.1f} s")
    return "\n".join([head] + extra)
