"""``fewstep report RUN_DIR``: one self-contained HTML page of a run, to open in a browser.

The page holds the run's configuration, its curves (losses, in-run metrics vs
images seen and vs wall-clock, time per iteration), its sample pictures over
time, the final metrics and the timing (training, evaluation and its share of
the time). Every picture is embedded as a base64 PNG and the style sheet is
inline, so the single file can be mailed, archived or attached to an issue;
it needs no network and no JavaScript. Pointed at a ``fewstep bench`` output
folder it renders the comparison instead (table, figures, per-method status).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import tempfile
import time
from pathlib import Path

from ..errors import FewstepError

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:1.5em;
color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}code,pre{background:#f5f5f5;border-radius:4px}pre{padding:.8em;overflow-x:auto;font-size:.85em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.facts td{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0;text-align:center}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.curves img{max-width:49%}.bad{color:#a00}.ok{color:#070}
"""


# ---------------------------------------------------------------------------------------- pieces
def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _img(path: Path, alt: str) -> str:
    return f'<img src="{_png_uri(path)}" alt="{_esc(alt)}">'


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    from ..training.run_dir import RunDir

    return RunDir(path.parent, main_process=False).read_jsonl(path.name)


def _fmt(v) -> str:
    from .tables import fmt

    return _esc(fmt(v))


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _facts(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in pairs if v not in (None, ""))
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _curves(stats: list[dict], metrics: list[dict], tmp: Path) -> list[tuple[str, Path]]:
    """PNG curves of a run: losses, headline metric vs kimg and vs time, diversity, time per iteration."""
    from .plots import plot_curves
    from .tables import metric_label, primary_metric

    out = []
    loss_keys = sorted({k for r in stats for k in r if k.startswith("loss/")})
    if loss_keys:
        series = {k[5:]: _finite([r["kimg"] for r in stats if k in r], [r[k] for r in stats if k in r])
                  for k in loss_keys}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            out.append(("losses", plot_curves(series, tmp / "losses.png", "images seen (kimg)", "loss",
                                              title="training losses (mean per log interval)")))
    pm = next((primary_metric(r) for r in reversed(metrics) if primary_metric(r)), None)
    if pm is not None:
        key, _, higher = pm
        ylabel = f"{metric_label(key)} ({'higher' if higher else 'lower'} is better)"
        pts = [r for r in metrics if key in r]
        for xkey, name, xlabel in (("kimg", "metric_vs_kimg", "images seen (kimg)"),
                                   ("train_seconds", "metric_vs_time", "training wall-clock (s)")):
            xs, ys = _finite([r.get(xkey, 0) for r in pts], [r[key] for r in pts])
            if xs:
                out.append((name, plot_curves({metric_label(key): (xs, ys)}, tmp / f"{name}.png", xlabel, ylabel,
                                              title=f"in-run evaluation: {metric_label(key)}")))
        def is_div(k, kk):  # the feature-net (or exact) diversity metric, not an Inception one
            return k == kk or kk.startswith(k + "_") and "inception" not in kk

        div = [k for k in ("precision", "recall", "mode_coverage") if any(is_div(k, kk) for r in pts for kk in r)]
        series = {}
        for k in div:
            kk = next(kk for r in pts for kk in r if is_div(k, kk))
            xs, ys = _finite([r["kimg"] for r in pts if kk in r], [r[kk] for r in pts if kk in r])
            if xs:
                series[metric_label(kk)] = (xs, ys)
        if series:
            out.append(("diversity", plot_curves(series, tmp / "diversity.png", "images seen (kimg)", "fraction",
                                                 title="precision / recall / mode coverage")))
    sp = _finite([r["kimg"] for r in stats if "sec_per_iter" in r], [r.get("sec_per_iter") for r in stats
                                                                     if "sec_per_iter" in r])
    if sp[0]:
        out.append(("speed", plot_curves({"seconds per iteration": sp}, tmp / "speed.png", "images seen (kimg)",
                                         "s / iteration", title="time per iteration")))
    return out


def _kimg_of(p: Path) -> float | None:
    m = re.search(r"(\d+(?:\.\d+)?)kimg", p.name)
    return float(m.group(1)) if m else None


def _sample_pictures(run: Path, max_pictures: int) -> list[tuple[str, Path]]:
    pics = sorted((p for p in (run / "samples").glob("samples-*.png")), key=lambda p: (_kimg_of(p) or 0, p.name))
    if len(pics) > max_pictures - 1:
        k = max(max_pictures - 1, 1)
        idx = sorted({round(i * (len(pics) - 1) / max(k - 1, 1)) for i in range(k)})
        pics = [pics[i] for i in idx]
    out = [(f"{_kimg_of(p):g} kimg" if _kimg_of(p) is not None else p.stem, p) for p in pics]
    final = run / "samples" / "final.png"
    if final.is_file():
        out.append(("final", final))
    return out


def _metrics_table(m: dict) -> str:
    from .tables import columns

    if not m:
        return "<p>No evaluation yet (run with <code>--eval-n N</code> to evaluate during and after training).</p>"
    cols = [(h, k) for h, k in columns(m) if k in m]
    extra = [(k, k) for k in ("nfe", "sampler", "n_samples", "samples_per_second") if k in m]
    extra += [(k, k) for k in m if k.startswith("label_accuracy")]  # label_accuracy_<feature net>
    rows = [[h, m[k]] for h, k in extra + cols]
    hist = next((k for k in m if k.startswith("class_hist_")), None) or (
        "component_hist" if "component_hist" in m else None)
    text = _table(["metric", "value"], rows)
    if hist:
        text += (f"<p>{_esc(hist)}: " + " ".join(_fmt(round(v, 3)) for v in m[hist]) + "</p>")
    return text


def _page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{_esc(h)}</h2>\n{c}\n" for h, c in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n"
            f'<body><h1>{_esc(title)}</h1><p class="sub">{_esc(subtitle)}</p>\n{body}'
            f'<p class="sub">Written by fewstep report on {_esc(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>'
            "</body></html>\n")


# ---------------------------------------------------------------------------------------- run report
def run_report_html(run_dir: str | Path, *, max_pictures: int = 12) -> str:
    """The HTML text of a run folder's report (see module docstring)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FewstepError(f"no run folder at {run}")
    config, summary = _read_json(run / "config.json"), _read_json(run / "summary.json")
    stats, metrics = _read_jsonl(run / "stats.jsonl"), _read_jsonl(run / "metrics.jsonl")
    if not config and not stats and not summary:
        raise FewstepError(f"{run} is not a fewstep run folder (no config.json, stats.jsonl or summary.json); "
                           "give the folder passed as --out to `fewstep teacher` or `fewstep distill`")
    method = summary.get("method") or config.get("method", "?")
    last = stats[-1] if stats else {}
    status = (f"finished ({summary['stop_reason']})" if summary else "in progress (no summary.json yet)")
    sections = []
    train_s = summary.get("train_seconds", last.get("train_seconds"))
    kimg = summary.get("kimg", last.get("kimg"))
    eval_s = summary.get("eval_seconds", sum(r.get("eval_seconds", 0) for r in metrics))
    share = summary.get("eval_share", eval_s / (train_s + eval_s) if train_s and eval_s is not None else None)
    spi = summary.get("sec_per_iter", last.get("sec_per_iter"))
    iters = summary.get("iterations", last.get("iteration"))
    per_iter = (kimg * 1000 / iters) if kimg and iters else None
    skipped = summary.get("evals_skipped")
    if skipped is None:
        log = (run / "log.txt").read_text() if (run / "log.txt").is_file() else ""
        skipped = log.count(" skipped: it would raise the evaluation share")
    sections.append(("Timing", _facts([
        ("status", status), ("images seen (kimg)", kimg), ("iterations", iters), ("training time (s)", train_s),
        ("in-run evaluation time (s)", eval_s), ("evaluation share of the time", share),
        ("evaluations skipped (time share bound)", skipped),
        ("seconds per iteration", spi), ("images per second", per_iter / spi if per_iter and spi else None),
        ("non-finite losses skipped", summary.get("nonfinite_losses", last.get("nonfinite_losses"))),
        ("processes", summary.get("processes"))])))
    final = summary.get("final_metrics") or (metrics[-1] if metrics else {})
    sections.append(("Final metrics" if summary.get("final_metrics") else "Latest metrics", _metrics_table(final)))
    with tempfile.TemporaryDirectory() as tmp:
        curves = _curves(stats, metrics, Path(tmp))
        sections.append(("Curves", '<div class="curves">' + "".join(_img(p, n) for n, p in curves) + "</div>"
                         if curves else "<p>No statistics logged yet.</p>"))
        pics = _sample_pictures(run, max_pictures)
        sections.append(("Samples over time", '<div class="grid">' + "".join(
            f"<figure>{_img(p, label)}<figcaption>{_esc(label)}</figcaption></figure>" for label, p in pics)
            + "</div>" if pics else "<p>No sample pictures yet.</p>"))
    stages = sorted((run / "stages").glob("steps-*"), key=lambda p: -int(p.name.split("-")[1])
                    if p.name.split("-")[1].isdigit() else 0)
    if stages:
        sections.append(("Stage students", "<ul>" + "".join(
            f"<li><code>{_esc(p.relative_to(run))}</code> — sample with "
            f"<code>fewstep sample {_esc(p)} --out s.png</code></li>" for p in stages) + "</ul>"))
    if config.get("command"):
        sections.append(("Command", f"<pre>{_esc(config['command'])}</pre>"))
    sections.append(("Configuration", f"<pre>{_esc(json.dumps(config, indent=2))}</pre>"))
    if (run / "log.txt").is_file():
        tail = (run / "log.txt").read_text().splitlines()[-60:]
        sections.append(("Log (last lines)", f"<pre>{_esc(chr(10).join(tail))}</pre>"))
    teacher = config.get("teacher") or config.get("data") or ""
    return _page(f"fewstep run: {method}", f"{run.resolve()} · {teacher} · {status}", sections)


# ---------------------------------------------------------------------------------------- bench report
def bench_report_html(bench_dir: str | Path) -> str:
    """The HTML page of a ``fewstep bench`` output folder (its results.json and figures)."""
    from .tables import columns

    d = Path(bench_dir)
    res = _read_json(d / "results.json")
    meta, rows = res.get("meta", {}), res.get("rows", [])
    sections = [("Setup", _facts([(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in meta.items()
                                  if k != "environment"] + list(meta.get("environment", {}).items())))]
    if rows:
        cols = columns(rows[0])
        headers = ["model", "sampler", "NFE"] + [h for h, _ in cols] + ["train kimg", "train s", "samples/s"]
        sections.append(("Results (same sample count and noise seed)", _table(headers, [
            [r.get("label"), r.get("sampler"), r.get("nfe")] + [r.get(k) for _, k in cols]
            + [r.get("train_kimg"), r.get("train_seconds"), r.get("samples_per_second")] for r in rows])))
    figs = [(k, d / v) for k, v in res.get("files", {}).items() if (d / v).is_file()]
    if figs:
        sections.append(("Figures", "".join(f"<figure>{_img(p, k)}<figcaption>{_esc(k)}</figcaption></figure>"
                                            for k, p in figs)))
    status = []
    for name, m in res.get("methods", {}).items():
        cls = "ok" if m.get("status") == "ok" else "bad"
        status.append(f'<li><b>{_esc(name)}</b>: <span class="{cls}">{_esc(m.get("status"))}</span> '
                      f'{_esc(m.get("reason", ""))}</li>')
    for name, why in res.get("absent", {}).items():
        status.append(f'<li><b>{_esc(name)}</b>: <span class="bad">absent</span> {_esc(why)}</li>')
    sections.append(("Methods", "<ul>" + "".join(status) + "</ul>"))
    return _page(f"fewstep bench: {meta.get('teacher', '?')}", meta.get("command", ""), sections)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run folder (or a bench folder) to ``out`` (default ``PATH/report.html``)."""
    from ..training.checkpoint import atomic_write_text

    p = Path(path)
    is_bench = _read_json(p / "results.json").get("format") == "fewstep.bench"
    text = bench_report_html(p) if is_bench else run_report_html(p)
    dest = Path(out) if out else p / "report.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, text)
    return dest


# ---------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    """Register ``fewstep report`` on the CLI's subparsers."""
    p = sub.add_parser("report", help="write a self-contained HTML page of a run (or a bench) folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (from fewstep teacher/distill) or fewstep bench output folder")
    p.add_argument("--out", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    dest = write_report(args.run_dir, args.out)
    print(dest)
    return 0


__all__ = ["add_parser", "bench_report_html", "run_report_html", "write_report"]
