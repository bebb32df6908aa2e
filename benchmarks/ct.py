"""Consistency training benchmark: a CT (iCT recipe) student beside consistency distillation, same budget, one machine.

    FEWSTEP_THREADS=1 python benchmarks/ct.py --only digits      # 28 minutes of CT on one core
    FEWSTEP_THREADS=1 python benchmarks/ct.py --only digits-cd   # at the same time on the other core: CD with
                                                                 # the settings of `cd.py --only digits`
    python benchmarks/ct.py --only table                         # teacher, CD and CT at noise seeds 1-3
    FEWSTEP_THREADS=1 python benchmarks/ct.py --only mixture     # ring8 data: CT's exact log-likelihood at 1/2/4 NFE,
    FEWSTEP_THREADS=1 python benchmarks/ct.py --only mixture-cd  # and CD's on the exact teacher, side by side

Both start from the shipped digits teacher's weights: CD takes one teacher Heun step per pair, CT none (both
points of a pair lie on one noising path of a training image). The two run side by side (one core each, the
same 28 minutes of training), so they compare at equal wall-clock on one machine; the table scores the teacher
(Heun, 35 NFE) and both students at 1, 2 and 4 NFE (multistep consistency sampling) on the same noise seeds and
sample count. Results: benchmarks/results/ct.json (+ the FD-vs-minutes plot), the CT student in
benchmarks/results/students/ct-digits.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cd import CD_OPTIONS, EVAL_EVERY, MIXTURE_MINUTES, MIXTURE_OPTIONS, run_mixture  # noqa: E402
from common import RESULTS, ROOT, RUNS, bench_main, read_curve  # noqa: E402
from sid import SHIPPED, _distill, _eval, _ship_student, fd_rows_by_seed, fd_table  # noqa: E402

DATA, N, MINUTES, SEEDS = "digits", 1000, 28.0, (1, 2, 3)
# CT's settings: iCT's recipe (N doubling from 11, the discretised log-normal pair law, λ = 1/Δσ, pseudo-Huber,
# μ = 0) from the teacher's weights, with the ct defaults s1 = 320 over a 100-kimg curriculum; batch 128, Adam
# lr 4e-4 and the exported EMA's half-life 5 kimg as CD's digits run. Trials (2026-12-02, 8-10 minutes, one core,
# two or three at a time; in-run FD at n = 500, noise seed 0, at 36 / 60 / 84 / 108 kimg): iCT's s1 = 1280 over
# 200 kimg 5.88 / 3.52 / 2.50 / 2.14; the same with lr 1e-4 17.2 / 5.33 (stopped); s1 = 1280 over 80 kimg 2.75 /
# 2.67, then 11.6 at 72 (N = 641 to 1281: the large grids undo the tuning) and 5.37 at 84; s1 = 160 over 100
# kimg 5.43 / 3.16 / 2.33 / 2.12; s1 = 320 over 100 kimg 4.13 / 2.72 / 2.24 / 1.89 (the defaults).
CT_OPTIONS = ("--batch-size", "128", "--lr", "4e-4", "--ema-halflife-kimg", "5")
# ring8 data from the shipped 8gaussians MLP, CD's mixture settings; the curriculum over the first 1000 kimg
CT_MIXTURE_OPTIONS = MIXTURE_OPTIONS + ("--curriculum-kimg", "1000")


def run_digits(method: str, options, minutes: float, commit: bool) -> dict:
    run = RUNS / f"ct-bench-{method}-digits"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill(method, str(SHIPPED / DATA), run, minutes, *options, eval_n=N, eval_every=EVAL_EVERY)
    out = {"distill": info, "run": str(run.relative_to(ROOT)), "curve": read_curve(run)}
    if commit:
        out["student_checkpoint"] = _ship_student(run, f"{method}-digits")
    else:
        out["settings"] = "benchmarks/cd.py CD_OPTIONS"
    return out


def table(results: dict) -> dict:
    ct = ROOT / results["digits"]["student_checkpoint"]
    cd = ROOT / results["digits-cd"]["run"]
    rows = {"teacher (Heun)": (SHIPPED / DATA, {"sampler": "heun", "steps": 18})}
    for label, path in (("CD", cd), ("CT", ct)):
        for k in (1, 2, 4):
            rows[label if k == 1 else f"{label} ({k} steps)"] = (path, {} if k == 1 else {"steps": k})
    out, key = fd_rows_by_seed(rows, N, SEEDS)
    runs = {"CD": results["digits-cd"], "CT": results["digits"]}
    table = fd_table(out, key, N, SEEDS, lambda label: runs.get(label.split(" ")[0], {}).get("distill", {}))
    return {"fd_key": key, "n_samples": N, "seeds": list(SEEDS), "rows": out, "table": table}


def plot(results: dict) -> str:
    """In-run FD (one step, seed 0) of both students against minutes of training: the equal-wall-clock view."""
    from fewstep.eval.plots import plot_curves

    curves = {"CT (1 NFE, EMA)": results["digits"]["curve"], "CD (1 NFE, EMA)": results["digits-cd"]["curve"]}
    key = next(k for k in curves["CT (1 NFE, EMA)"][0] if k.startswith("fd_") and "floor" not in k)
    teacher = _eval(SHIPPED / DATA, N, seed=0, sampler="heun", steps=18)[key]
    series = {label: ([r["train_seconds"] / 60 for r in c], [r[key] for r in c]) for label, c in curves.items()}
    end = max(xs[-1] for xs, _ in series.values())
    series["teacher Heun (35 NFE)"] = ([0.0, end], [teacher, teacher])
    path = RESULTS / "ct_digits_fd_curve.png"
    plot_curves(series, path, xlabel="minutes of training (one core)", ylabel=f"FD ({key[3:]}, n={N}, seed 0)",
                logy=True, title="consistency training vs distillation on digits: FD vs wall-clock")
    return str(path.relative_to(ROOT))


def main() -> None:
    parts = {"digits": lambda m: run_digits("ct", CT_OPTIONS, m or MINUTES, commit=True),
             "digits-cd": lambda m: run_digits("cd", CD_OPTIONS, m or MINUTES, commit=False),
             "mixture": lambda m: run_mixture(m or MIXTURE_MINUTES, "ct", CT_MIXTURE_OPTIONS, "CT"),
             "mixture-cd": lambda m: run_mixture(m or MIXTURE_MINUTES),
             "table": lambda m: {**table(r := json.loads((RESULTS / "ct.json").read_text())), "curve_plot": plot(r)}}
    bench_main(__doc__, "ct.json", "ct.py", parts, ["digits", "table"],
               f"override the training budget (digits: {MINUTES:g}, mixture: {MIXTURE_MINUTES:g})")


if __name__ == "__main__":
    main()
