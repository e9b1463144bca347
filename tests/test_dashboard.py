"""The dashboard page: its structure (unit), and that it opens in a real browser (headless
Chromium) with no JavaScript error and data in every figure."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from clr_lambda_search.search.plots import dashboard_html
from clr_lambda_search.search.study import campaign_studies, mask_url, open_storage

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
STUDY_FIGURES = 5  # history, slice over λ, intermediate values, EDF, timeline
FINAL_FIGURES = 4  # accuracy, loss, cost, η
OVERVIEW_FIGURES = 1  # validation accuracy over λ with every phase overlaid (one per parameter)
BAND_FIGURES = 1  # the final seeds' validation accuracy, mean ± std (two seeds or more)
CONFIRM_FIGURES = 2  # the confirm phase: paired differences to the pick, accuracy per seed (not Optuna's)
BUNDLE = re.compile(r"^\* plotly\.js v\d", re.MULTILINE)  # opens the plotly.js bundle
FIG_DIV = re.compile(r'<div id="([^"]+)" class="plotly-graph-div"')
NEW_PLOT = re.compile(r'Plotly\.newPlot\(\s*"([^"]+)"')


# ---- unit: the page built from a small study -----------------------------------------------------

def fake_study(storage, name, n=4, seed=0):
    """A study shaped like the search's: λ on a log scale, two half-cycle reports, user attrs."""
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    study.set_user_attr("space", [{"name": "lam", "low": 1e-5, "high": 1e-1, "log": True}])
    study.set_user_attr("sampler", "random")

    def objective(trial):
        lam = trial.suggest_float("lam", 1e-5, 1e-1, log=True)
        acc = 0.45 - 0.02 * abs(np.log10(lam) + 3)
        trial.report(acc - 0.05, 10)
        trial.report(acc, 20)
        for key, value in {"val_acc_std": 0.0, "val_loss": 1.6, "train_acc": acc + 0.05,
                           "seconds": 0.1}.items():
            trial.set_user_attr(key, value)
        return acc
    study.optimize(objective, n_trials=n)
    return study


def fake_final():
    history = [{"step": s, "epoch": s // 10, "lr": 0.01,
                "train": {"acc": 0.1 + s / 100, "loss": 2.3 - s / 20, "cost": 2.4 - s / 20},
                "val": {"acc": 0.1 + s / 120, "loss": 2.3 - s / 25, "cost": 2.4 - s / 25}}
               for s in range(0, 21, 5)]
    metrics = {"params": {"lam": 1e-3}, "source": {"study": "u-fine", "trial": 1, "phase": "fine"},
               "seeds": [{"seed": 0, "test_acc": 0.3}, {"seed": 1, "test_acc": 0.32}],
               "test_acc_mean": 0.31, "test_acc_std": 0.01}
    config = {"n_s": 10, "cycles": 1, "eta_min": 1e-5, "eta_max": 0.1}
    return {"metrics": metrics, "config": config, "history": history}


@pytest.fixture(scope="module")
def small_campaign(tmp_path_factory):
    """Storage with a coarse and a fine study of campaign 'u' (the library, no training)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"sqlite:///{tmp_path_factory.mktemp('dash_unit') / 's.db'}")
    fake_study(storage, "u-coarse", seed=0)
    fake_study(storage, "u-fine", seed=1)
    return storage


def test_page_holds_one_plotly_bundle_and_one_div_per_figure(small_campaign):
    studies = campaign_studies(small_campaign, "u")
    assert [s.study_name for s in studies] == ["u-coarse", "u-fine"]  # coarse first
    page = dashboard_html("u", "sqlite:///s.db", studies, fake_final())
    n_figs = OVERVIEW_FIGURES + 2 * STUDY_FIGURES + FINAL_FIGURES
    # plotly.js inlined exactly once (self-contained, opens offline; not once per figure)
    assert len(BUNDLE.findall(page)) == 1
    # no external script (a CDN): the page must open offline
    assert not re.search(r"<script[^>]*\bsrc=", page)
    # one div per figure, unique ids, each plotted by exactly one newPlot call
    divs = FIG_DIV.findall(page)
    assert len(divs) == n_figs and len(set(divs)) == n_figs, divs
    assert NEW_PLOT.findall(page) == divs
    # the bundle precedes the first newPlot (else the page throws "Plotly is not defined")
    assert BUNDLE.search(page).start() < page.index("Plotly.newPlot(")
    assert page.count("<html") == 1 and page.rstrip().endswith("</html>")
    for name in ("u-coarse", "u-fine", "Final run", "0.3100"):
        assert name in page, name  # both studies and the final result are on the page


def test_page_without_final_run(small_campaign):
    page = dashboard_html("u", "sqlite:///s.db", campaign_studies(small_campaign, "u"))
    assert len(FIG_DIV.findall(page)) == OVERVIEW_FIGURES + 2 * STUDY_FIGURES
    assert len(BUNDLE.findall(page)) == 1  # the first study figure carries the bundle then
    assert "Final run" not in page


def test_storage_password_is_masked(small_campaign):
    url = "postgresql+psycopg://u:secret@h/db"
    label = mask_url(url)
    assert "secret" not in label and label == "postgresql+psycopg://u:***@h/db"
    page = dashboard_html("u", label, campaign_studies(small_campaign, "u"), fake_final())
    assert "secret" not in page
    assert "postgresql+psycopg://u:***@h/db" in page  # the masked URL is shown, not dropped
    assert "secret" not in mask_url("notaurl://x:secret@")  # even a malformed URL is not echoed


def test_campaign_name_is_escaped(small_campaign):
    # the campaign name is user input: it must not inject markup into the page
    page = dashboard_html("<script>alert(1)</script>", "sqlite:///s.db",
                          campaign_studies(small_campaign, "u"))
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_outputs_are_keyed_by_storage(tmp_path, monkeypatch):
    """The default storage's campaign writes studies/<campaign>/; any other storage's
    studies/<campaign>-<8 hex digits of its masked URL>/ (no secret in the name, and a new
    password does not move the outputs)."""
    from clr_lambda_search.search.study import DEFAULT_STORAGE, outputs_dir

    monkeypatch.chdir(tmp_path)
    assert outputs_dir("c") == outputs_dir("c", DEFAULT_STORAGE) == Path("studies/c")
    same_file = f"sqlite:///{tmp_path / 'studies' / 'studies.db'}"
    assert outputs_dir("c", same_file) == Path("studies/c")  # the default file, by another URL
    others = ["sqlite:///a.db", "sqlite:///b.db", "postgresql+psycopg://u:secret@h/db"]
    dirs = [outputs_dir("c", url) for url in others]
    assert len(set(dirs)) == 3 and all(re.fullmatch(r"c-[0-9a-f]{8}", d.name) for d in dirs)
    assert all(d.parent == Path("studies") for d in dirs)
    assert outputs_dir("c", "postgresql+psycopg://u:other@h/db") == dirs[2]
    assert "secret" not in str(dirs[2])
    # a release before the rule wrote a's outputs to studies/c/: they stay a's, not b's
    Path("studies/c").mkdir(parents=True)
    Path("studies/c/dashboard.html").write_text("<h1>x</h1><p>storage sqlite:///a.db</p>")
    assert outputs_dir("c", "sqlite:///a.db") == Path("studies/c")
    assert outputs_dir("c", "sqlite:///b.db") == dirs[1]
    dirs[0].mkdir()  # once a's keyed folder exists, it is a's
    assert outputs_dir("c", "sqlite:///a.db") == dirs[0]


def test_two_storages_do_not_overwrite_each_others_dashboard(tmp_path):
    """scripts/dashboard.py of one campaign name in two storages, default paths: two pages."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for db, n in (("a.db", 2), ("b.db", 3)):
        fake_study(open_storage(f"sqlite:///{tmp_path / db}"), "u-coarse", n=n)
    pages = []
    for db in ("a.db", "b.db"):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "dashboard.py"),
                               "--campaign", "u", "--storage", f"sqlite:///{db}", "-q", "--json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pages.append(tmp_path / json.loads(proc.stdout)["out"])
    assert pages[0] != pages[1] and all(p.is_file() for p in pages)
    assert {p.parent.name[:2] for p in pages} == {"u-"}
    assert "sqlite:///a.db" in pages[0].read_text() and "sqlite:///b.db" in pages[1].read_text()


# ---- browser: headless Chromium loads the page written by scripts/dashboard.py -----------------

# Injected at the top of <head>, before plotly.js: records every error, and after load checks
# that each plotted element (.js-plotly-plot) has traces and at least one trace with points. The
# verdict goes into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || e.type));
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__errors.push("unhandled rejection: " + String(e.reason));
});
(function () {
  var original = console.error;
  console.error = function () {
    window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  setTimeout(function () {
    var figures = [];
    document.querySelectorAll(".js-plotly-plot").forEach(function (el) {
      var full = el._fullData || [];
      figures.push({id: el.id, traces: (el.data || []).length,
                    points: full.map(function (t) { return t._length || 0; })});
    });
    var pre = document.createElement("pre");
    pre.id = "probe-verdict";
    pre.textContent = JSON.stringify({errors: window.__errors, figures: figures});
    document.body.appendChild(pre);
    document.title = "PROBE-DONE";
  }, 1000);
});
</script>"""
# The probe's negative control: a script error and a figure without data.
SABOTAGE = """<div id="ctl"></div><script>
Plotly.newPlot("ctl", []);
throw new Error("control error");
</script>"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--virtual-time-budget=10000"]
TINY = ["--n-val", "20", "--n-s", "10", "--cycles", "1", "--n-batch", "20"]


def chromium_or_skip():
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must run the browser tests")
        pytest.skip(f"{CHROMIUM} is missing")


def run_script(script, args, env):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "-q", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def dashboard_page(tmp_path_factory, cifar_tiny_dir):
    """dashboard.html of a campaign with coarse, fine and a final run (tiny settings)."""
    chromium_or_skip()  # before the scripts: no browser, no work
    base = tmp_path_factory.mktemp("dash_browser")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}
    env["CIFAR10_CACHE"] = str(base / "cache")
    common = ["--campaign", "b", "--storage", f"sqlite:///{base / 's.db'}"]
    data = ["--data-dir", str(cifar_tiny_dir.batches)]
    run_script("search.py", ["coarse", *common, *data, *TINY, "--n-trials", "3",
                             "--pruner", "none"], env)
    run_script("search.py", ["fine", *common, *data, *TINY, "--n-trials", "3",
                             "--pruner", "none"], env)
    run_script("search.py", ["confirm", *common, *data, *TINY], env)
    run_script("final.py", [*common, *data, *TINY, "--seeds", "2", "--out", str(base / "final")],
               env)
    summary = run_script("dashboard.py", [*common, "--out", str(base / "dashboard.html"),
                                          "--final-dir", str(base / "final")], env)
    assert summary["studies"] == ["b-coarse", "b-fine", "b-confirm"] and summary["final"] is True
    assert summary["figures"] == (OVERVIEW_FIGURES + 2 * STUDY_FIGURES + CONFIRM_FIGURES
                                  + BAND_FIGURES + FINAL_FIGURES)
    return base / "dashboard.html"


def chromium(args, profile):
    shutil.rmtree(profile, ignore_errors=True)
    return subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def with_probe(page_text, extra_body=""):
    head = page_text.index("<head>") + len("<head>")
    body_end = page_text.rindex("</body>")
    return page_text[:head] + PROBE + page_text[head:body_end] + extra_body + page_text[body_end:]


def verdict(dom):
    match = re.search(r'<pre id="probe-verdict">(.*?)</pre>', dom, re.DOTALL)
    assert match, "the probe did not run: no verdict in the DOM (scripts did not run or load " \
                  "never fired)"
    return json.loads(html.unescape(match.group(1)))


@pytest.fixture(scope="module")
def browser_runs(dashboard_page, tmp_path_factory):
    """Three Chromium runs at once: the probed page, the sabotaged control, a screenshot."""
    chromium_or_skip()
    base = tmp_path_factory.mktemp("chromium")
    text = dashboard_page.read_text(encoding="utf-8")
    probed = dashboard_page.with_name("probed.html")  # beside the original: same relative paths
    probed.write_text(with_probe(text), encoding="utf-8")
    control = dashboard_page.with_name("control.html")
    control.write_text(with_probe(text, SABOTAGE), encoding="utf-8")
    shot = base / "shot.png"
    procs = {
        "probed": chromium(["--dump-dom", probed.as_uri()], base / "p1"),
        "control": chromium(["--dump-dom", control.as_uri()], base / "p2"),
        "shot": chromium(["--enable-logging=stderr", "--v=0", "--window-size=1400,2000",
                          f"--screenshot={shot}", dashboard_page.as_uri()], base / "p3"),
    }
    results = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            results[key] = (proc.returncode, out, err)
    finally:  # stop what this fixture started, and only that
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results["shot_png"] = shot
    return results


@pytest.mark.browser
def test_probe_catches_errors_and_empty_figures(browser_runs):
    # negative control: the same probe, on the page plus a throwing script and an empty figure,
    # must report both, so a clean verdict below means something
    code, dom, err = browser_runs["control"]
    assert code == 0, err[-2000:]
    v = verdict(dom)
    assert any("control error" in e for e in v["errors"]), v["errors"]
    ctl = [f for f in v["figures"] if f["id"] == "ctl"]
    assert ctl and ctl[0]["traces"] == 0


@pytest.mark.browser
def test_dashboard_opens_without_errors_and_every_figure_has_data(browser_runs, dashboard_page):
    code, dom, err = browser_runs["probed"]
    assert code == 0, err[-2000:]
    v = verdict(dom)
    assert v["errors"] == []  # no uncaught error, rejected promise or console.error
    expected = FIG_DIV.findall(dashboard_page.read_text(encoding="utf-8"))
    # every figure div of the page was turned into a plot ...
    assert [f["id"] for f in v["figures"]] == expected
    assert len(expected) == (OVERVIEW_FIGURES + 2 * STUDY_FIGURES + CONFIRM_FIGURES
                             + BAND_FIGURES + FINAL_FIGURES)
    for fig in v["figures"]:
        # ... with at least one trace, and at least one trace holding points
        assert fig["traces"] >= 1 and max(fig["points"]) > 0, fig


@pytest.mark.browser
def test_dashboard_screenshot_is_not_blank(browser_runs):
    from PIL import Image

    code, _, err = browser_runs["shot"]
    assert code == 0, err[-2000:]
    assert "Uncaught" not in err  # Chromium's console log: no uncaught JavaScript exception
    with Image.open(browser_runs["shot_png"]) as img:
        assert img.size == (1400, 2000)
        rgb = img.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 22)
        pixels = np.asarray(rgb)
    # rendered plots: many colours (traces, grid, anti-aliased text), not a blank or flat page
    assert len(colours) > 100, len(colours)
    # and a good part of the page is not the white background (plot areas are tinted)
    not_white = np.any(pixels < 245, axis=2).mean()
    assert not_white > 0.10, not_white


def test_two_parameters_get_a_slice_each_on_their_scale_and_the_joint_figures(tmp_path):
    from clr_lambda_search.search.plots import study_figures

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(study_name="two-coarse", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr("space", [{"name": "lam", "low": 1e-5, "high": 1e-1, "log": True},
                                  {"name": "m", "low": 10, "high": 100, "step": 1, "log": False,
                                   "type": "int"}])
    study.optimize(lambda t: 0.4 + 0.01 * t.suggest_int("m", 10, 100) / 100
                   - 0.01 * abs(np.log10(t.suggest_float("lam", 1e-5, 1e-1, log=True)) + 3),
                   n_trials=6)
    figs = dict(study_figures(study))
    # one slice per parameter, λ on a log axis (it is searched log-uniformly), m on a linear one
    assert figs["Validation accuracy over lam"].layout.xaxis.type == "log"
    assert figs["Validation accuracy over m"].layout.xaxis.type in (None, "linear")
    # with two parameters: Optuna's contour, parallel-coordinate and importance figures too
    assert {"Contour", "Parallel coordinates", "Parameter importances"} <= set(figs)
    assert len(figs) == STUDY_FIGURES - 1 + 2 + 3


def fake_confirm(storage, name="u-confirm"):
    """A confirm study as the confirm phase records it: 3 candidates on 4 paired seeds, the
    third dropped after 3; its space is the coarse phase's, its class sampler 'random'."""
    from clr_lambda_search.search import record

    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    cands = [{"params": {"lam": lam, "m": m}, "study": "u-fine", "trial": i}
             for i, (lam, m) in enumerate([(1e-3, 50), (2e-3, 100), (5e-2, 50)])]
    scores = {"0": [0.50, 0.52, 0.51, 0.53], "1": [0.49, 0.50, 0.50, 0.50],
              "2": [0.40, 0.41, 0.39]}
    record.update(study, campaign="u", phase="confirm", kind="confirm", index=2,
                  space=[{"name": "lam", "low": 1e-5, "high": 1e-1, "log": True}],
                  sampler="random", pruner="none", candidates=cands,
                  seeds=[1000, 1001, 1002, 1003],
                  verdict={"pick": 0, "runner_up": 1, "sentence": "lam=0.001 m=50 is better",
                           "params": cands[0]["params"], "scores": scores,
                           "dropped": {"2": 3}, "means": {}})
    return study


@pytest.fixture
def storage(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_storage(f"sqlite:///{tmp_path / 's.db'}")


def test_the_confirm_phase_gets_its_own_figures_not_optunas(storage):
    """Paired differences to the pick with their t interval, and the accuracy per seed with
    the seeds as categories (no tick at seed 1,000.5); none of Optuna's search figures."""
    from clr_lambda_search.search.confirm import paired_interval
    from clr_lambda_search.search.plots import study_figures

    study = fake_confirm(storage)
    (t1, diff), (t2, per_seed) = study_figures(study)
    assert t1.startswith("Confirm phase: paired difference to the pick lam=0.001 m=50")
    assert t2 == "Confirm phase: validation accuracy per paired seed"
    *seeds, mean = diff.data
    assert [t.name for t in seeds] == ["seed 1000", "seed 1001", "seed 1002", "seed 1003"]
    assert list(seeds[0].y) == ["lam=0.002 m=100", "lam=0.05 m=50"]
    assert seeds[0].x == pytest.approx([-1.0, -10.0])  # candidate − pick, in points
    assert seeds[3].x[1] is None  # the dropped candidate has no 4th seed
    d, half = paired_interval([0.49, 0.50, 0.50, 0.50], [0.50, 0.52, 0.51, 0.53])
    assert mean.x[0] == pytest.approx(100 * d) and mean.error_x.array[0] == pytest.approx(100 * half)
    assert diff.layout.yaxis.type == "category" and per_seed.layout.xaxis.type == "category"
    axis = ["seed 1000", "seed 1001", "seed 1002", "seed 1003"]
    assert list(per_seed.data[0].x) == axis == list(per_seed.layout.xaxis.categoryarray)
    assert per_seed.data[2].name.endswith("(dropped after 3 seeds)")


def test_the_campaign_table_shows_each_phases_real_spec(storage):
    from clr_lambda_search.search import record
    from clr_lambda_search.search.plots import campaign_table

    confirm = fake_confirm(storage, "u2-confirm")
    fine = fake_study(storage, "u-fine")
    record.update(fine, sampler={"name": "TPESampler", "multivariate": True},
                  narrowed={"from_study": "u-coarse", "from_trials": [1, 2], "rule": "span"})
    table = html.unescape(campaign_table([fine, confirm]))
    row = table[table.index("u2-confirm"):]
    assert "queued (candidates × seeds)" in row and "random" not in row
    assert "3 candidates: lam=0.001 m=50; lam=0.002 m=100; lam=0.05 m=50" in row
    assert "× 4 paired seeds (1000–1003)" in row and "1e-05" not in row  # not coarse's range
    assert "TPESampler(multivariate=True)" in table  # the sampler as configured
    assert "(narrowed from u-coarse: span)" in table


def test_every_figure_title_names_the_searched_parameters(storage):
    """Optuna's figures, the overview, the confirm figures and the final run's curves: each
    title names what was searched (the final run's: the values it trained, and the seed)."""
    from clr_lambda_search.search.plots import curve_figures, overview_figures, seeds_band_figure
    from clr_lambda_search.search.plots import study_figures

    study = optuna.create_study(study_name="w-coarse", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 0.4 + t.suggest_float("dropout", 0.0, 0.5)
                   - 0.01 * abs(np.log10(t.suggest_float("lam", 1e-5, 1e-1, log=True)) + 3),
                   n_trials=4)
    figs = [f for _, f in study_figures(study) + overview_figures([study])]
    figs += [f for _, f in study_figures(fake_confirm(storage, "w-confirm"))]
    final = fake_final()
    figs += [f for _, f in curve_figures(final["history"], final["config"], "lam=0.001 m=512, seed 0")]
    figs.append(seeds_band_figure({0: final["history"], 1: final["history"]}, final["config"],
                                  "lam=0.001 m=512")[1])
    assert len(figs) >= 16
    for fig in figs:
        title = fig.layout.title.text
        assert ("searched: dropout, lam" in title or "searched: lam, m" in title
                or "lam=0.001 m=512" in title), title


def test_overview_overlays_every_phase_and_the_final_section_shows_the_seeds(small_campaign):
    from clr_lambda_search.search.plots import overview_figures

    studies = campaign_studies(small_campaign, "u")
    (name, fig), = overview_figures(studies)  # one figure per searched parameter
    assert name == "lam" and fig.layout.xaxis.type == "log"
    assert [t.name for t in fig.data] == ["u-coarse", "u-fine"]  # one trace (colour) per phase
    assert [len(t.x) for t in fig.data] == [4, 4]
    final = fake_final()
    final["histories"] = {0: final["history"], 1: final["history"]}
    final["metrics"]["seeds"] = [{"seed": 0, "val_acc": 0.3, "test_acc": 0.3},
                                 {"seed": 1, "val_acc": 0.32, "test_acc": 0.32}]
    page = dashboard_html("u", "sqlite:///s.db", studies, final)
    assert "accuracy over the seeds" in page and "mean ± std" in page
    assert "0.3100 ± 0.0100" in page  # the seeds table's test accuracy row
    assert "<h2>The campaign</h2>" in page and "validation accuracy" in page
