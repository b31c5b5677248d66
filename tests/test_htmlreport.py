"""report.html: a run's self-contained page, `heads report`, and its check in headless Chromium.

The Chromium tests skip where no Chromium is installed (CI images may lack it); they need the
Debian package `chromium` (/usr/bin/chromium).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from heads.cli import main as heads_main
from heads.figstyle import Figure, FigureContext, pyplot, save_figure
from heads.htmlreport import write_report
from heads.metrics import bootstrap_ci, classification_metrics
from heads.report import comparison_table

from test_heads import planted_cache

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--set", "lightgbm.n_estimators=30", "--bootstrap", "100",
        "--folds", "stratified", "--k", "3"]


def run_cli(*args):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def load_checker():
    spec = importlib.util.spec_from_file_location("check_report", ROOT / "scripts" / "check_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_report"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("report_run")
    csv, cache = planted_cache(tmp, tiny_weights, n_per_class=20)
    out = tmp / "run"
    result = run_cli("compare", "--heads", "logreg,lightgbm", "--cache", cache, "--data", csv, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    return csv, cache, out


def test_a_run_writes_a_report_with_its_table_tests_classes_figures_and_provenance(planted_run):
    csv, cache, out = planted_run
    page = (out / "report.html").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    # The headline table: every method by its readable name, each metric with its interval.
    for method, title in (("logreg", "logistic regression"), ("lightgbm", "LightGBM")):
        m = metrics["methods"][method]
        lo, hi = m["ci95"]["macro_f1"]
        assert f"<td class=\"text\">{title}</td>" in page
        assert f"{m['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]" in page
        for cls, v in m["per_class"].items():
            assert f"<td class=\"text\">{cls}</td><td>{v['support']}</td><td>{v['precision']:.3f}</td>" in page
    # The paired test, in its own table.
    (test,) = metrics["paired_tests"].values()
    d = test["macro_f1_difference"]
    assert "<h2>Paired tests</h2>" in page
    assert f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" in page
    # Provenance: the data by its sha256, the backbone, the head parameters, versions, the command.
    assert hashlib.sha256(csv.read_bytes()).hexdigest() in page
    assert config["backbone"]["weights_sha256"] in page
    assert "Cs=[0.1, 1.0]" in page
    assert config["software"]["torch"] in page and "scikit-learn" in page
    assert config["command"][1:3] == ["compare", "--heads"]
    assert "compare --heads logreg,lightgbm --cache" in page
    assert config["fingerprint"] in page
    # Every figure inline, byte for byte; nothing fetched from elsewhere, no scripts.
    pngs = sorted((out / "plots").glob("*.png"))
    assert pngs and page.count("data:image/png;base64,") == len(pngs)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode() in page
    assert not re.search(r"<script|<link|<iframe|https?://|src=\"(?!data:)", page, re.IGNORECASE)


def test_command_line_and_versions_are_in_config_json_but_not_in_the_fingerprint(planted_run, tmp_path):
    csv, cache, out = planted_run
    config = json.loads((out / "config.json").read_text())
    again = tmp_path / "again"
    # The same run typed another way: options in another order, and --verbose.
    result = run_cli("compare", *FAST, "--out", again, "--data", csv, "--cache", cache, "--heads",
                     "logreg,lightgbm", "-v")
    assert result.exit_code == 0, result.output
    other = json.loads((again / "config.json").read_text())
    assert other["command"] != config["command"] and "-v" in other["command"]
    assert other["fingerprint"] == config["fingerprint"]
    assert {"python", "torch", "scikit-learn", "lightgbm", "numpy"} <= set(config["software"])
    assert config["data_files"] == [{"role": "data", "path": str(csv),
                                     "sha256": hashlib.sha256(csv.read_bytes()).hexdigest()}]


def test_heads_report_rebuilds_the_report_byte_for_byte(planted_run, tmp_path):
    _, _, out = planted_run
    rebuilt = tmp_path / "rebuilt.html"
    result = run_cli("report", out, "--out", rebuilt)
    assert result.exit_code == 0, result.output
    assert rebuilt.read_bytes() == (out / "report.html").read_bytes()


def test_heads_report_of_a_run_written_before_reports(planted_run, tmp_path):
    _, _, out = planted_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "report.html").unlink()
    config = json.loads((old / "config.json").read_text())
    for key in ("report", "software", "command", "data_files"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))  # not under the manifest's hash
    result = run_cli("report", old)
    assert result.exit_code == 0, result.output
    page = (old / "report.html").read_text()
    assert "not recorded (the run predates it)" in page and "Not recorded" in page
    assert page.count("data:image/png;base64,") == len(list((old / "plots").glob("*.png")))
    assert "logistic regression" in page


def test_heads_report_refuses_a_foreign_or_unfinished_directory(planted_run, tmp_path):
    _, _, out = planted_run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    result = run_cli("report", foreign)
    assert result.exit_code != 0 and "not a run directory" in result.output
    assert "Traceback" not in result.output and not (foreign / "report.html").exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "report.html").unlink()
    config = json.loads((unfinished / "config.json").read_text())
    del config["manifest_sha256"]
    (unfinished / "config.json").write_text(json.dumps(config))
    result = run_cli("report", unfinished)
    assert result.exit_code != 0 and "did not finish" in result.output
    assert not (unfinished / "report.html").exists()


def test_report_shows_per_group_metrics_and_areas_under_curves(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    proba = np.clip(np.eye(2)[y] * 0.6 + rng.random((200, 2)) * 0.5, 0, None)
    proba /= proba.sum(1, keepdims=True)
    groups = np.array(["archaea", "positive", "negative", "negative"] * 50)
    m = classification_metrics(y, proba, ["Cytoplasmic", "Membrane"], groups)
    m["ci95"] = bootstrap_ci(y, proba.argmax(1), 2, n_boot=100)
    metrics = {"logreg": m}
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    stem = tmp_path / "plots" / "curve"
    save_figure(fig, stem)
    context = FigureContext("planted", "tiny", "3 folds", 200)
    path = write_report(tmp_path, context, [Figure(stem, "Curves", "A line.")], metrics, {},
                        comparison_table(metrics), {"data": "x.csv"}, [])
    page = path.read_text()
    assert "<h2>Per group</h2>" in page and "<h2>Curves</h2>" in page and "A line." in page
    for group, g in m["per_group"].items():
        assert f"<td class=\"text\">{group}</td><td>{g['n']}</td><td>{g['accuracy']:.3f}</td>" in page
    assert f"<td>{m['roc_auc']:.3f}</td><td>{m['pr_auc']:.3f}</td>" in page


chromium = pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
                              reason="needs Chromium (Debian package chromium) to render the page")


@chromium
def test_chromium_renders_a_run_report_without_a_problem(planted_run, tmp_path):
    _, _, out = planted_run
    checker = load_checker()
    shot = tmp_path / "page.png"
    assert checker.check_page(out / "report.html", shot) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checker.main([str(out / "report.html")]) == 0


@chromium
def test_chromium_check_names_a_broken_image_and_a_throwing_script(tmp_path):
    bad = tmp_path / "bad.html"
    not_png = base64.b64encode(b"this is not an image").decode()
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                   f'<img src="data:image/png;base64,{not_png}" alt="broken figure">'
                   "<script>console.error('drawn wrong'); undefinedFunction();</script></body></html>")
    checker = load_checker()
    problems = checker.check_page(bad)
    assert any("broken figure" in p and "did not decode" in p for p in problems), problems
    assert any("undefinedFunction is not defined" in p for p in problems), problems
    assert any("console error" in p and "drawn wrong" in p for p in problems), problems
    assert checker.main([str(bad)]) == 1


def _damage_png(run):
    png = sorted((run / "plots").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:40])  # a PNG's signature and header, its image cut off


def _edit_config(change):
    def damage(run):
        config = json.loads((run / "config.json").read_text())
        change(config)
        (run / "config.json").write_text(json.dumps(config))
    return damage


DAMAGES = {
    "truncated figure": (_damage_png, "a figure of the run is damaged"),
    "figure replaced by text": (lambda run: [p.write_text("not an image") for p in (run / "plots").glob("*.png")],
                                "a figure of the run is damaged"),
    "metrics of another shape": (lambda run: (run / "metrics.json").write_text('{"methods": [1, 2]}'),
                                 "metrics.json: cannot be read as a run's metrics"),
    "metrics a list": (lambda run: (run / "metrics.json").write_text("[]"),
                       "metrics.json: cannot be read as a run's metrics"),
    "empty comparison table": (lambda run: (run / "comparison.csv").write_text(""),
                               "comparison.csv: cannot be read as the run's comparison table"),
    "report record damaged": (_edit_config(lambda c: c["report"]["context"].update(extra=1)),
                              "its 'report' record is damaged"),
    "figure outside the run": (_edit_config(lambda c: c["report"]["figures"][0].update(png="../../outside.png")),
                               "lists a figure outside the run"),
    "report.html a directory": (lambda run: (run / "report.html").mkdir(), "is a directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_heads_report_of_a_damaged_run_is_an_error_naming_the_file_and_writes_nothing(planted_run, tmp_path, damage):
    _, _, out = planted_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "report.html").unlink()
    (tmp_path / "outside.png").write_bytes((run / "plots" / "comparison.png").read_bytes())
    change, message = DAMAGES[damage]
    change(run)
    result = run_cli("report", run)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert message in result.output
    assert not (run / "report.html").is_file()
