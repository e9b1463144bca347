"""Escaping: text from a storage, a results folder or the command line never runs in the page.

Anyone who can write to a shared storage can write study and trial attrs, study names, parameter
names and failure messages. Every such field gets hostile markup here; the page is opened in
headless Chromium with alert/confirm/prompt replaced by counters, and must count zero calls. A
control page with the same payload left unescaped must count them (the probe works).
"""
import re

import optuna
import pytest

from clr_lambda_search.search.plots import dashboard_html
from clr_lambda_search.search.study import campaign_studies, open_storage
from test_dashboard import chromium, chromium_or_skip, fake_final

PAYLOADS = ["<img src=x onerror=alert(document.domain)>", "\"'><script>alert(2)</script>",
            "</script><script>confirm(3)</script>", "<svg onload=prompt(4)>"]
HOSTILE = "".join(PAYLOADS)
# Installed before anything else runs: every call is counted in an attribute of <html>.
COUNTER = ("<script>(function(){var n=0;function c(){n++;document.documentElement.setAttribute("
           "'data-calls',String(n));}window.alert=c;window.confirm=c;window.prompt=c;"
           "document.documentElement.setAttribute('data-calls','0');})();</script>")
CALLS = re.compile(r'<html[^>]*\bdata-calls="(\d+)"')


def hostile_campaign(storage):
    """A coarse and a fine study whose every text field holds HOSTILE."""
    campaign = "c" + HOSTILE
    for phase in ("coarse", "fine"):
        study = optuna.create_study(study_name=f"{campaign}-{phase}", storage=storage,
                                    direction="maximize")
        study.set_user_attr("space", [{"name": "lam", "low": 1e-5, "high": 1e-1, "log": True}])
        study.set_user_attr("phase", phase)
        study.set_user_attr("fine_range", {"low": HOSTILE, "high": 0.1, "coarse_study": HOSTILE,
                                           "from_trials": HOSTILE, "rule": HOSTILE})
        for i, state in enumerate(("complete", "complete", "fail", "pruned")):
            trial = study.ask()
            lam = trial.suggest_float("lam", 1e-5, 1e-1, log=True)
            trial.suggest_categorical("opt" + HOSTILE, [HOSTILE, "plain"])
            trial.report(0.3 + i / 100, 10)
            for key in ("failure", "val_acc_std", "val_loss", "train_acc", "seconds", HOSTILE):
                trial.set_user_attr(key, HOSTILE)
            if state == "complete":
                study.tell(trial, 0.4 + lam)
            elif state == "fail":
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    hostile_confirm(storage, campaign)
    return campaign


def hostile_confirm(storage, campaign):
    """A confirm study whose candidates, seeds and verdict hold HOSTILE: its own figures (the
    paired differences, the seeds as categories) and the campaign table's spec show them."""
    study = optuna.create_study(study_name=f"{campaign}-confirm", storage=storage,
                                direction="maximize")
    cands = [{"params": {"lam": 1e-3, HOSTILE: HOSTILE}, "study": HOSTILE, "trial": 0},
             {"params": {"lam": 2e-3, HOSTILE: "plain"}, "study": HOSTILE, "trial": 1}]
    verdict = {"pick": 0, "runner_up": 1, "diff": 0.01, "half_width": 0.02,
               "sentence": HOSTILE, "params": cands[0]["params"],
               "scores": {"0": [0.4, 0.42], "1": [0.39, 0.43]}, "dropped": {"1": HOSTILE},
               "means": {"0": 0.41, "1": 0.41}}
    for key, value in {"campaign": campaign, "phase": "confirm", "kind": "confirm",
                       "phase_index": 2,
                       "candidates": cands, "confirm_seeds": [HOSTILE, 1001],
                       "sampler": HOSTILE, "pruner": HOSTILE, "verdict": verdict}.items():
        study.set_user_attr(key, value)


def hostile_final():
    final = fake_final()
    final["metrics"]["source"] = {"study": HOSTILE, "trial": HOSTILE, "phase": HOSTILE}
    final["metrics"]["lam"] = HOSTILE  # a results folder of the releases before campaign files
    final["metrics"]["params"] = {HOSTILE: HOSTILE, "lam": HOSTILE}
    final["metrics"]["seeds"][0]["seed"] = HOSTILE
    final["metrics"]["seeds"][1]["test_acc"] = HOSTILE
    final["metrics"]["test_acc_std"] = HOSTILE
    return final


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    chromium_or_skip()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = tmp_path_factory.mktemp("escaping")
    storage = open_storage(f"sqlite:///{base / 's.db'}")
    campaign = hostile_campaign(storage)
    text = dashboard_html(campaign, HOSTILE, campaign_studies(storage, campaign), hostile_final())
    head = text.index("<head>") + len("<head>")
    page = base / "page.html"
    page.write_text(text[:head] + COUNTER + text[head:], encoding="utf-8")
    control = base / "control.html"  # the payloads as a page would carry them unescaped
    control.write_text(text[:head] + COUNTER + text[head:].replace("</body>", HOSTILE + "</body>"),
                       encoding="utf-8")
    runs = {name: chromium(["--dump-dom", path.as_uri()], base / f"profile-{name}")
            for name, path in (("page", page), ("control", control))}
    doms = {}
    try:
        for name, proc in runs.items():
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            doms[name] = out
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return {"text": text, **doms}


def calls(dom):
    match = CALLS.search(dom)
    assert match, "the counter did not run"
    return int(match.group(1))


@pytest.mark.browser
def test_the_probe_counts_an_unescaped_payload(pages):
    assert calls(pages["control"]) >= len(PAYLOADS)


@pytest.mark.browser
def test_hostile_fields_run_nothing_in_the_browser(pages):
    assert calls(pages["page"]) == 0


@pytest.mark.browser
def test_hostile_fields_reach_the_page_as_text(pages):
    text = pages["text"]
    for payload in PAYLOADS:
        assert payload not in text  # raw markup nowhere: neither in the HTML nor in a figure
    assert "&lt;img src=x onerror=alert(document.domain)&gt;" in text  # but shown, escaped
    assert "Confirm phase: paired difference to the pick" in text  # the confirm figures are on it
    # the rendered page shows the text (no element was made of it)
    assert "<img src=\"x\"" not in pages["page"] and "<svg onload" not in pages["page"]


def test_status_text_shows_control_characters_as_text(tmp_path):
    from clr_lambda_search.search.report import status_report, status_text

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="t-coarse", storage=storage, direction="maximize")
    study.set_user_attr("phase", "coarse")
    trial = study.ask()
    trial.suggest_float("lam", 1e-5, 1e-1, log=True)
    trial.set_user_attr("failure", "\x1b]0;owned\x07\x1b[2J\x1b[1A hidden")  # retitle, clear
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    text = status_text(status_report(storage, "t"))
    assert "\x1b" not in text and "\x07" not in text
    assert "?]0;owned??[2J?[1A hidden" in text
