"""Run logging (stats, TensorBoard, progress, bounded in-run evaluation), `fewstep report`, README results."""
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fewstep.cli import main

NET = json.dumps({"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16})
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny teacher run with TensorBoard, a progress bar and a 5 % bound on in-run evaluation time."""
    out = tmp_path_factory.mktemp("report") / "run"
    code = main(["teacher", "--data", "8gaussians", "--out", str(out), "--net", NET, "--total-kimg", "2.56",
                 "--batch-size", "128", "--log-every-kimg", "0.256", "--snapshot-every-kimg", "0.64",
                 "--checkpoint-every-kimg", "100", "--eval-n", "100", "--eval-every-kimg", "0.256",
                 "--eval-max-share", "0.05", "--tensorboard"])
    assert code == 0
    return out


def test_run_folder_holds_stats_tensorboard_and_a_bounded_evaluation_log(run, capfd):
    stats = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert len(stats) >= 5 and all("loss/denoiser" in r and "train_seconds" in r for r in stats)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("log_likelihood" in r and "eval_seconds" in r for r in metrics)
    summary = json.loads((run / "summary.json").read_text())
    log = (run / "log.txt").read_text()
    assert "skipped when it would exceed 5% of the time" in log
    assert "evaluation share of time so far" in log
    # evaluations of this tiny run cost more than 5 % of its time: all but the first in-run one are skipped
    assert summary["evals_skipped"] >= 1 and "skipped: it would raise the evaluation share" in log
    assert len(metrics) + summary["evals_skipped"] == 9 + 1  # 9 in-run evaluation points, then the final one
    assert 0 < summary["eval_share"] < 1


def test_progress_bar_shows_the_metric_and_throughput(tmp_path, capfd):
    capfd.readouterr()
    assert main(["teacher", "--data", "8gaussians", "--out", str(tmp_path / "r"), "--net", NET, "--total-kimg", "1.28",
                 "--batch-size", "128", "--log-every-kimg", "0.128", "--eval-n", "50", "--eval-every-kimg", "0.256",
                 "--snapshot-every-kimg", "100", "--checkpoint-every-kimg", "100"]) == 0
    err = capfd.readouterr().err
    assert "kimg" in err and "img/s" in err and "log_likelihood=" in err


def test_report_is_one_self_contained_html_file(run, capsys):
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    page = run / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    text = page.read_text()
    for section in ("Timing", "Final metrics", "Curves", "Samples over time", "Configuration", "Log (last lines)",
                    "evaluation share of the time", "log-lik"):
        assert section in text, section
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    out = run.parent / "elsewhere" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0 and out.is_file()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    page = run / "report.html"
    if not page.is_file():
        assert main(["report", str(run)]) == 0
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Final metrics" in dom.stdout and dom.stdout.count("<img") >= 5
    shot = tmp_path / "shot.png"
    res = subprocess.run(args + ["--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100  # something was drawn, not a blank page


def test_report_of_a_bench_folder_and_clear_errors(tmp_path, capsys):
    from fewstep.eval.plots import plot_curves

    d = tmp_path / "bench"
    plot_curves({"a": ([0, 1], [1, 0])}, d / "metric_vs_nfe.png", "NFE", "FD")
    rows = [{"label": "teacher (heun)", "model": "teacher", "sampler": "heun", "nfe": 35, "kind": "mixture",
             "log_likelihood": -1.0, "mode_coverage": 1.0, "precision": 0.9, "recall": 0.9}]
    (d / "results.json").write_text(json.dumps({
        "format": "fewstep.bench", "meta": {"teacher": "mixture:ring8", "command": "fewstep bench ...",
                                            "environment": {"torch": "x"}},
        "rows": rows, "methods": {"sid": {"status": "skipped", "reason": "needs --init"}},
        "absent": {"consistency": "not registered"}, "files": {"nfe": "metric_vs_nfe.png"}}))
    assert main(["report", str(d)]) == 0
    text = (d / "report.html").read_text()
    assert "fewstep bench: mixture:ring8" in text and "needs --init" in text and "consistency" in text
    assert "data:image/png;base64," in text and "mode coverage" in text
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a fewstep run folder" in capsys.readouterr().err


def _readme_script():
    spec = importlib.util.spec_from_file_location("make_readme_results", ROOT / "benchmarks" / "make_readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_are_generated_with_their_commands(tmp_path):
    mod = _readme_script()
    res = tmp_path / "results"
    res.mkdir()
    readme = tmp_path / "README.md"
    # no results, no README: the file is created with the markers and a note
    assert mod.main(["--results", str(res), "--readme", str(readme)]) == 0
    assert mod.START in readme.read_text() and "No benchmark results yet" in readme.read_text()
    readme.write_text("# fewstep\n\nIntro by the lead.\n\n" + readme.read_text() + "\n## After\n")
    (res / "sid.json").write_text(json.dumps({
        "commands": {"mixture": "python benchmarks/sid.py --only mixture"},
        "mixture": {"ring8": {"distill": {"command": "fewstep distill sid --teacher mixture:ring8 --out r",
                                          "kimg": 100.0, "train_seconds": 240.0},
                              "teacher_exact_heun35": {"nfe": 35, "log_likelihood": -0.031},
                              "student_sid_1nfe": {"nfe": 1, "log_likelihood": -0.0123}}}}))
    (res / "progressive-quick.json").write_text(json.dumps({
        "meta": {"mode": "quick", "machine": "x", "seconds": 5},
        "rows": [{"teacher": "digits", "method": "progressive", "steps": 2, "nfe": 2, "fd": 6.78, "precision": 0.2,
                  "train_kimg": 24, "n_samples": 300}]}))
    (res / "broken.json").write_text("{not json")
    bench = res / "ring8"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({
        "format": "fewstep.bench", "meta": {"teacher": "mixture:ring8", "budget_kimg": 5, "eval_n": 1000,
                                            "command": "fewstep bench --teacher mixture:ring8 --budget-kimg 5"},
        "rows": [{"label": "kd", "nfe": 1, "kind": "mixture", "log_likelihood": -0.4567, "mode_coverage": 1.0}],
        "methods": {"kd": {"status": "ok"}, "sid": {"status": "skipped", "reason": "needs --init"}}}))
    assert mod.main(["--results", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# fewstep\n\nIntro by the lead.") and text.rstrip().endswith("## After")
    assert text.count(mod.START) == 1 and text.count(mod.END) == 1
    row = next(line for line in text.splitlines() if "-0.0123" in line)
    assert "fewstep distill sid --teacher mixture:ring8" in row  # the number and its command on one line
    assert "FD = 6.78" in text and "python benchmarks/progressive.py --quick" in text
    assert "-0.4567" in text and "fewstep bench --teacher mixture:ring8 --budget-kimg 5" in text
    assert "sid (needs --init)" in text and "broken.json` skipped" in text
    assert mod.main(["--results", str(res), "--readme", str(readme), "--check"]) == 0
    before = readme.read_text()
    assert mod.main(["--results", str(res), "--readme", str(readme)]) == 0 and readme.read_text() == before
    (res / "sid.json").unlink()
    assert mod.main(["--results", str(res), "--readme", str(readme), "--check"]) == 1


def test_the_metrics_table_shows_label_accuracy_of_any_feature_net():
    from fewstep.eval.report import _metrics_table

    html = _metrics_table({"kind": "images", "fd_digits-featnet": 0.7, "label_accuracy_digits-featnet": 0.93})
    assert "label_accuracy_digits-featnet" in html and "0.93" in html
