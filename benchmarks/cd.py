"""Consistency distillation benchmark: a CD student against its teacher and against SiD, same budget, one machine.

    FEWSTEP_THREADS=1 python benchmarks/cd.py --only digits       # 28 minutes of CD on one core
    FEWSTEP_THREADS=1 python benchmarks/cd.py --only digits-sid   # at the same time on the other core: SiD with
                                                                  # the settings of `sid.py --only digits`
    python benchmarks/cd.py --only table                          # teacher, SiD and CD at noise seeds 1-3
    python benchmarks/cd.py --only mixture                        # exact ring8 teacher: CD's log-likelihood at 1/2/4 NFE

The two distillations run side by side (one core each, the same 28 minutes of training), so their
students compare at equal wall-clock on one machine. The table scores the teacher (Heun, 35 NFE), the SiD
student (1 NFE) and the CD student at 1, 2 and 4 NFE (multistep consistency sampling) on the same noise
seeds and sample count. Results: benchmarks/results/cd.json (+ the CD FD curve), the CD student in
benchmarks/results/students/cd-digits.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, bench_main, read_curve  # noqa: E402
from sid import SHIPPED, _distill, _eval, _pick, _ship_student, fd_rows_by_seed, fd_table, side_by_side_sid  # noqa: E402

DATA, N, MINUTES, SEEDS = "digits", 1000, 28.0, (1, 2, 3)
# CD's settings: the reference's N = 18, μ = 0.95 and Heun teacher steps; batch 128 as SiD's digits run; the
# exported EMA's half-life 5 kimg. Six-minute trials at these settings (two at a time, one core each; in-run FD at
# n = 500, noise seed 0, at 15 / 30 / 45 kimg): L2 with Adam lr 1e-4 55.4 / 4.36 / 2.16, lr 4e-4 59.0 / 2.73 / 1.89,
# lr 1e-3 62.3 / 2.74; pseudo-Huber (iCT) with lr 4e-4 67.9 / 2.23, 1.83 at 38 kimg. Hence lr 4e-4 and pseudo-Huber
# (the reference's LPIPS needs weights no package ships).
CD_OPTIONS = ("--batch-size", "128", "--lr", "4e-4", "--distance", "pseudo-huber", "--num-scales", "18",
              "--ema-halflife-kimg", "5")
EVAL_EVERY = 12.0
MIXTURE, MIXTURE_INIT, MIXTURE_MINUTES, MIXTURE_N = "ring8", "8gaussians", 6.0, 20000
# ring8 from the shipped 8gaussians MLP (the exact teacher has no weights): lr 1e-3 (1e-4 reached log-likelihood
# -0.50 at 1 NFE after 300 kimg where 1e-3 reached -0.30; the teacher's Heun samples: -0.148 at n = 5000)
MIXTURE_OPTIONS = ("--batch-size", "256", "--lr", "1e-3", "--ema-halflife-kimg", "20", "--snapshot-every-kimg", "200",
                   "--checkpoint-every-kimg", "200")


def run_cd(minutes: float) -> dict:
    run = RUNS / "cd-digits"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("cd", str(SHIPPED / DATA), run, minutes, *CD_OPTIONS, eval_n=N, eval_every=EVAL_EVERY)
    curve = read_curve(run)
    return {"distill": info, "student_checkpoint": _ship_student(run, "cd-digits"), "curve": curve}


def run_mixture(minutes: float, method: str = "cd", options=MIXTURE_OPTIONS, label: str = "CD") -> dict:
    """A consistency model (``method``: cd, or ct from benchmarks/ct.py) on the exact ring8 teacher or its data:
    exact log-likelihood and mode coverage of its 1-, 2- and 4-step samples against the teacher's 35-NFE Heun
    samples (same n and noise seed)."""
    run = RUNS / f"{method}-mixture-{MIXTURE}"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill(method, f"mixture:{MIXTURE}", run, minutes, "--init", str(SHIPPED / MIXTURE_INIT), *options)
    rows = {"teacher (exact, Heun)": _pick(_eval(f"mixture:{MIXTURE}", MIXTURE_N, sampler="heun", steps=18))}
    for k in (1, 2, 4):
        rows[f"{label} ({k} step{'s' if k > 1 else ''})"] = _pick(_eval(run, MIXTURE_N, steps=k))
    for name, r in rows.items():
        print(name, r["nfe"], round(r["log_likelihood"], 4), r["mode_coverage"], flush=True)
    return {"mixture": MIXTURE, "distill": info, "n_samples": MIXTURE_N, "seed": 1, "rows": rows}


def table(results: dict) -> dict:
    cd = ROOT / results["digits"]["student_checkpoint"]
    sid = ROOT / results["digits-sid"]["run"]
    rows = {"teacher (Heun)": (SHIPPED / DATA, {"sampler": "heun", "steps": 18}),
            "SiD": (sid, {}), "CD": (cd, {}), "CD (2 steps)": (cd, {"steps": 2}), "CD (4 steps)": (cd, {"steps": 4})}
    out, key = fd_rows_by_seed(rows, N, SEEDS)
    runs = {"CD": results["digits"], "SiD": results["digits-sid"]}
    table = fd_table(out, key, N, SEEDS, lambda label: runs.get(label.split(" ")[0], {}).get("distill", {}))
    return {"fd_key": key, "n_samples": N, "seeds": list(SEEDS), "rows": out, "table": table}


def plot(results: dict) -> str:
    from fewstep.eval.plots import plot_curves

    curve = results["digits"]["curve"]
    key = next(k for k in curve[0] if k.startswith("fd_") and "floor" not in k)
    teacher = _eval(SHIPPED / DATA, N, seed=0, sampler="heun", steps=18)
    xs = [r["kimg"] for r in curve]
    path = RESULTS / "cd_digits_fd_curve.png"
    plot_curves({"CD student (1 NFE, EMA)": (xs, [r[key] for r in curve]),
                 "teacher Heun (35 NFE)": (xs, [teacher[key]] * len(xs))},
                path, xlabel="images seen (kimg)", ylabel=f"FD ({key[3:]}, n={N}, seed 0)", logy=True,
                title="consistency distillation on digits: FD vs images seen")
    return str(path.relative_to(ROOT))


def table_and_plot(results: dict) -> dict:
    return {**table(results), "curve_plot": plot(results)}


def main() -> None:
    parts = {"digits": lambda m: run_cd(m or MINUTES),
             "digits-sid": lambda m: side_by_side_sid("cd-bench-sid-digits", m or MINUTES),
             "mixture": lambda m: run_mixture(m or MIXTURE_MINUTES),
             "table": lambda m: table_and_plot(json.loads((RESULTS / "cd.json").read_text()))}
    bench_main(__doc__, "cd.json", "cd.py", parts, ["digits", "table"],
               f"override the training budget (digits: {MINUTES:g}, mixture: {MIXTURE_MINUTES:g})")


if __name__ == "__main__":
    main()
