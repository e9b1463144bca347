"""Tables and summaries of studies, as dicts (for --json) and as text (the report's tables).

Every table has one column per searched parameter, named as the study's trials name them.
"""
import logging
import re

import numpy as np
from optuna.trial import TrialState

from clr_lambda_search.search import record
from clr_lambda_search.search.space import Categorical, format_params, format_value, on_border, space_from_dict
from clr_lambda_search.search.study import campaign_studies, finished_trials, named_study, retried_from

log = logging.getLogger(__name__)


def trial_row(t):
    """One trial as a plain dict; "params" is the trial's own params."""
    attrs = t.user_attrs
    return {"number": t.number, "state": t.state.name, "params": dict(t.params),
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
    """The best trial as a dict; of a confirm study, its verdict's pick (mean over its seeds)."""
    verdict = record.verdict(study)
    if verdict is not None:
        scores = verdict["scores"][str(verdict["pick"])]
        return {"number": None, "params": dict(verdict["params"]),
                "val_acc": float(np.mean(scores)), "val_acc_std": float(np.std(scores))}
    done = finished_trials(study)
    if not done:
        return None
    best = done[0]
    return {"number": best.number, "params": dict(best.params), "val_acc": best.value,
            "val_acc_std": best.user_attrs.get("val_acc_std")}


def study_space(study):
    """The parameters the study recorded (none for a define-by-run space)."""
    return space_from_dict(record.read(study).space or [])


def narrowing(study):
    """How the study's space was derived from an earlier phase, or None. (Studies of the
    releases that searched λ alone recorded it as "fine_range".)"""
    return record.read(study).narrowed


def border_warnings(study, best):
    """A sentence per numeric parameter whose best value sits on a border of its range."""
    if best is None or record.read(study).grid:
        return []
    widen = ("raise the narrow margin (--margin)" if narrowing(study) else
             "widen its range in the campaign file (or --low/--high)")
    return [f"the best {p.name} {format_value(best['params'][p.name])} lies on a border of "
            f"[{format_value(p.low)}, {format_value(p.high)}]: the optimum may be outside the "
            f"range; {widen}"
            for p in study_space(study)
            if p.name in best["params"] and on_border(p, best["params"][p.name])]


def study_report(study):
    """The study as a dict; trials sorted best first. Surplus trials (bookkeeping of parallel
    workers that raced for the last slot, never trained) are counted, not listed."""
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: (t.state != TrialState.COMPLETE, -(t.value or 0), t.number))
    surplus = [t for t in trials if record.is_bookkeeping(t)]
    trials = [t for t in trials if not record.is_bookkeeping(t)]
    best = best_row(study)
    rec = record.read(study)
    return {"name": study.study_name, "phase": rec.phase, "kind": rec.kind,
            "params": param_names(study, trials), "space": rec.space,
            "spec": phase_spec(rec)[1], "sampler": phase_spec(rec)[0],
            "best": best, "trials": [trial_row(t) for t in trials],
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_surplus": len(surplus),
            "repeats": rec.repeats,
            "narrowed": narrowing(study),
            "warnings": border_warnings(study, best),
            "confirm": confirm_summary(study)}


def _trial_ref(best):
    """'#12 ' for a trial, '' for a confirm phase's pick (a mean over seeds, not one trial)."""
    return "" if best["number"] is None else f"#{best['number']} "


def confirm_summary(study):
    """A confirm study's candidates, per-seed means and verdict (its sentence), else None."""
    rec = record.read(study)
    if not rec.races:
        return None
    verdict = record.verdict(study)
    return {"candidates": rec.candidates, "seeds": rec.seeds,
            "verdict": verdict, "sentence": verdict and verdict.get("sentence")}


def param_names(study, trials):
    """The study's parameter names: its space's order, then any others its trials have."""
    names = [p.name for p in study_space(study)]
    return names + sorted({n for t in trials for n in t.params} - set(names))


def status_report(storage, campaign=None, study=None):
    """{"campaign", "studies": [study_report, ...]} of a campaign, or of the study named `study`;
    InputError for an unknown campaign or study."""
    studies = named_study(storage, study) if study else campaign_studies(storage, campaign)
    return {"campaign": campaign if not study else record.read(studies[0]).campaign,
            "studies": [study_report(s) for s in studies]}


def _fmt(x, spec):
    return format(x, spec) if x is not None else "—"


def _cell(value):
    if value is None:
        return "—"
    return f"{value:.3e}" if isinstance(value, float) else str(value)


def space_text(space):
    """'lam ∈ [1e-05, 0.1] (log), n_batch ∈ {50, 100}'."""
    parts = []
    for p in space_from_dict(space or []):
        if isinstance(p, Categorical):
            parts.append(f"{p.name} ∈ {{{', '.join(map(str, p.choices))}}}")
        else:
            step = f" step {p.step}" if getattr(p, "step", 1) != 1 else ""
            parts.append(f"{p.name} ∈ [{format_value(p.low)}, {format_value(p.high)}]{step}"
                         + (" (log)" if p.log else ""))
    return ", ".join(parts) or "define-by-run"


def phase_spec(rec):
    """(sampler, space) cells of a phase as it ran: a confirm phase's candidates and seeds (its
    trials are queued: no sampler draws them), a search phase's space as recorded (a narrowed
    one's narrowed range, and where it came from) and its sampler as configured."""
    if rec.races:
        cands = rec.candidates if isinstance(rec.candidates, list) else []
        seeds = rec.seeds or []
        span = f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else ", ".join(map(str, seeds))
        text = (f"{len(cands)} candidates: " + "; ".join(format_params(c.get("params", {}))
                                                         for c in cands)
                + f" × {len(seeds)} paired seeds ({span})") if cands else "candidates not derived yet"
        return "queued (candidates × seeds)", text
    space = space_text(rec.space)
    n = rec.narrowed
    if isinstance(n, dict):
        space += f" (narrowed from {n.get('from_study')}: {n.get('rule')})"
    return sampler_text(rec.sampler), space


def sampler_text(spec):
    """'TPESampler(multivariate=True, n_startup_trials=3)' of a recorded sampler spec."""
    if isinstance(spec, dict):
        kwargs = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name")
        return f"{spec.get('name')}({kwargs})"
    return "—" if spec is None else str(spec)


def study_text(rep):
    names = rep["params"]
    lines = [f"== {rep['name']}: {rep['n_complete']} complete trials"
             + (f", {rep['repeats']} seeds per trial" if rep["repeats"] > 1 else ""),
             f"   {'ran' if rep.get('confirm') else 'space'}: {rep['spec']}"]
    if rep["narrowed"]:
        n = rep["narrowed"]
        # (the rule is in the spec above already)
        lines.append(f"   narrowed from {n['from_study']} trials {n['from_trials']}")
    lines.append(f"   {'#':>4} " + "".join(f"{n:>10} " for n in names)
                 + f"{'state':>9} {'val acc':>16} {'val loss':>9} {'train acc':>9} {'s':>6}")
    for r in rep["trials"]:
        acc = _fmt(r["val_acc"], ".4f") + (f" ± {r['val_acc_std']:.4f}"
                                           if r["val_acc"] is not None and rep["repeats"] > 1 else "")
        note = f"retry of #{r['retry_of']}" if r["retry_of"] is not None else (r["failure"] or "")
        cells = "".join(f"{_cell(r['params'].get(n)):>10} " for n in names)
        lines.append(f"   {r['number']:>4} {cells}{r['state']:>9} {acc:>16} "
                     f"{_fmt(r['val_loss'], '9.4f')} {_fmt(r['train_acc'], '9.4f')} "
                     f"{_fmt(r['seconds'], '6.1f')} {note}".rstrip())
    if rep["best"]:
        b = rep["best"]
        lines.append(f"   best: {_trial_ref(b)}{format_params(b['params'])}, "
                     f"val acc {b['val_acc']:.4f}")
    lines += [f"   warning: {w}" for w in rep["warnings"]]
    if rep.get("confirm") and rep["confirm"]["sentence"]:
        lines.append(f"   verdict: {rep['confirm']['sentence']} (seed noise on the one "
                     "validation set)")
    return "\n".join(lines)


def status_text(report):
    return terminal_safe("\n\n".join(study_text(s) for s in report["studies"]))


_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text):
    """text with every control character but the newline shown as '?': a storage's strings must
    not move the cursor, retitle the window or hide lines in the user's terminal (ANSI escapes)."""
    return _CONTROL.sub("?", text)


def phase_summary(study, storage_label, seconds):
    """A phase's study after a run: its best (a confirm phase's pick and verdict), its space and
    how it was derived, and warnings (a best value on a border of its range)."""
    rec = record.read(study)
    best = best_row(study)
    warnings = border_warnings(study, best)
    for w in warnings:
        log.warning(w)
    return {"campaign": rec.campaign, "phase": rec.phase, "study": study.study_name,
            "storage": storage_label, "n_complete": len(finished_trials(study)),
            "n_trials": rec.n_trials, "best": best, "space": rec.space,
            "spec": phase_spec(rec)[1],
            "narrowed": narrowing(study), "verdict": record.verdict(study), "warnings": warnings,
            "seconds": round(seconds, 2)}


def summary_text(s):
    if s.get("verdict"):
        return terminal_safe(f"{s['study']}: {s['verdict']['sentence']}")
    b = s["best"]
    head = (f"{s['study']}: {s['n_complete']} complete trials; best {format_params(b['params'])}"
            f" ({'confirmed' if b['number'] is None else 'trial #' + str(b['number'])}), val acc "
            f"{b['val_acc']:.4f}" if b
            else f"{s['study']}: no complete trial")
    extra = []
    if s["narrowed"]:
        extra.append(f"narrowed space {space_text(s['space'])} ({s['narrowed']['rule']})")
    extra += ["warning: " + w for w in s["warnings"]]
    extra.append(f"storage {s['storage']}, {s['seconds']:.1f} s")
    return terminal_safe("\n".join([head] + extra))
