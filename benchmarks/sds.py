"""Score distillation sampling beside Diff-Instruct (its variational fix): same budget, one machine.

    FEWSTEP_THREADS=1 python benchmarks/sds.py --only digits-sds   # 10 minutes of SDS on one core
    FEWSTEP_THREADS=1 python benchmarks/sds.py --only digits-di    # at the same time on the other core: Diff-Instruct
    python benchmarks/sds.py --only table                          # teacher, SDS, Diff-Instruct at noise seeds 1-3
    FEWSTEP_THREADS=1 python benchmarks/sds.py --only mixture-sds  # exact ring8 teacher, 4 minutes each, side by
    FEWSTEP_THREADS=1 python benchmarks/sds.py --only mixture-di   # side, then --only mixture-table

SDS is Diff-Instruct with the fake score's denoiser replaced by the sample itself, so the two runs differ in
that alone (same generator initialisation, σ distribution, optimiser, batch, learning rate and EMA). SDS is
mode-seeking: the table reads it in precision (samples near the data) against recall (data near the samples),
and on the exact mixture in the exact log-likelihood, MMD, the samples' spread and their mean distance from the
data mean (SDS seeks the peaks of the noise-averaged density, which large noise levels pull towards that mean). Results: benchmarks/results/sds.json; the students in
benchmarks/results/students/{sds-digits, diff-instruct-digits}.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, bench_main  # noqa: E402
from sid import SHIPPED, _distill, _eval, _pick, _ship_student, fd_rows_by_seed  # noqa: E402

DATA, N, MINUTES, SEEDS = "digits", 1000, 10.0, (1, 2, 3)
OPTIONS = {"sds": ("--batch-size", "128", "--lr", "1e-4"),
           "diff-instruct": ("--batch-size", "128", "--lr-g", "1e-4", "--lr-fake", "1e-4")}
EVAL_EVERY = 12.0
MIXTURE, MIXTURE_INIT, MIXTURE_MINUTES, MIXTURE_N = "ring8", "8gaussians", 4.0, 20000
MIXTURE_COMMON = ("--batch-size", "256", "--ema-halflife-kimg", "20", "--snapshot-every-kimg", "200",
                  "--checkpoint-every-kimg", "200")
MIXTURE_OPTIONS = {"sds": ("--lr", "1e-4"), "diff-instruct": ("--lr-g", "1e-4", "--lr-fake", "1e-4")}


def run_digits(method: str, minutes: float) -> dict:
    run = RUNS / f"sds-bench-{method}-digits"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill(method, str(SHIPPED / DATA), run, minutes, *OPTIONS[method], eval_n=N, eval_every=EVAL_EVERY)
    return {"method": method, "distill": info, "student_checkpoint": _ship_student(run, f"{method}-digits")}


def table(results: dict) -> dict:
    rows = {"teacher (Heun)": (SHIPPED / DATA, {"sampler": "heun", "steps": 18}),
            "SDS": (ROOT / results["digits-sds"]["student_checkpoint"], {}),
            "Diff-Instruct": (ROOT / results["digits-di"]["student_checkpoint"], {})}
    out, key = fd_rows_by_seed(rows, N, SEEDS)
    feat = key[3:]
    lines = [f"| model | NFE | kimg | s per iteration | FD ({feat}) seeds {', '.join(map(str, SEEDS))} | mean | "
             "precision, mean | recall, mean |", "|---|---|---|---|---|---|---|---|"]
    for label, r in out.items():
        d = {"SDS": results["digits-sds"], "Diff-Instruct": results["digits-di"]}.get(label, {}).get("distill", {})
        prec = sum(r["by_seed"][str(s)][f"precision_{feat}"] for s in SEEDS) / len(SEEDS)
        rec = sum(r["by_seed"][str(s)][f"recall_{feat}"] for s in SEEDS) / len(SEEDS)
        r["precision_mean"], r["recall_mean"] = prec, rec
        lines.append(f"| {label} | {r['nfe']} | {round(d['kimg']) if d else '–'} | "
                     f"{round(d['sec_per_iter'], 2) if d else '–'} | "
                     + " / ".join(f"{r['by_seed'][str(s)][key]:.3f}" for s in SEEDS)
                     + f" | {r['fd_mean']:.3f} | {prec:.3f} | {rec:.3f} |")
    return {"fd_key": key, "n_samples": N, "seeds": list(SEEDS), "rows": out, "table": "\n".join(lines)}


def run_mixture(method: str, minutes: float) -> dict:
    run = RUNS / f"sds-bench-{method}-mixture-{MIXTURE}"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill(method, f"mixture:{MIXTURE}", run, minutes, "--init", str(SHIPPED / MIXTURE_INIT),
                    *MIXTURE_COMMON, *MIXTURE_OPTIONS[method])
    return {"method": method, "distill": info, "run": str(run.relative_to(ROOT))}


def mixture_table(results: dict) -> dict:
    from fewstep.diffusion.mixture import preset
    from fewstep.model import load_model

    centre = preset(MIXTURE).mean().float()
    models = {"teacher (exact, Heun)": (f"mixture:{MIXTURE}", {"sampler": "heun", "steps": 18}),
              "SDS": (ROOT / results["mixture-sds"]["run"], {}),
              "Diff-Instruct": (ROOT / results["mixture-di"]["run"], {})}
    rows = {}
    for label, (path, kw) in models.items():
        r = _pick(_eval(path, MIXTURE_N, **kw))
        x = load_model(path).sample(MIXTURE_N, seed=1, **kw).x
        r["sample_std"] = float(x.std(0).mean())
        r["distance_from_data_mean"] = float((x - centre).norm(dim=1).mean())
        rows[label] = r
        print(label, r["nfe"], round(r["log_likelihood"], 4), r["mode_coverage"], round(r["mmd_rbf"], 5),
              round(r["sample_std"], 4), round(r["distance_from_data_mean"], 4), flush=True)
    return {"mixture": MIXTURE, "n_samples": MIXTURE_N, "seed": 1, "rows": rows}


def main() -> None:
    load = lambda: json.loads((RESULTS / "sds.json").read_text())  # noqa: E731
    parts = {"digits-sds": lambda m: run_digits("sds", m or MINUTES),
             "digits-di": lambda m: run_digits("diff-instruct", m or MINUTES),
             "table": lambda m: table(load()),
             "mixture-sds": lambda m: run_mixture("sds", m or MIXTURE_MINUTES),
             "mixture-di": lambda m: run_mixture("diff-instruct", m or MIXTURE_MINUTES),
             "mixture-table": lambda m: mixture_table(load())}
    bench_main(__doc__, "sds.json", "sds.py", parts, None,
               f"override the training budget (digits: {MINUTES:g}, mixture: {MIXTURE_MINUTES:g})")


if __name__ == "__main__":
    main()
