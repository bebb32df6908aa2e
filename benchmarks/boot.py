"""BOOT benchmark: a data-free BOOT student against its teacher and against SiD, same budget, one machine.

    FEWSTEP_THREADS=1 python benchmarks/boot.py --only digits       # 28 minutes of BOOT on one core
    FEWSTEP_THREADS=1 python benchmarks/boot.py --only digits-sid   # at the same time on the other core: SiD with
                                                                    # the settings of `sid.py --only digits`
    python benchmarks/boot.py --only table                          # teacher, SiD, BOOT (and KD) at noise seeds 1-3
    FEWSTEP_THREADS=1 python benchmarks/boot.py --only mixture      # exact ring8 teacher: log-likelihood, modes

The two distillations run side by side (one core each, the same 28 minutes of training), so their students
compare at equal wall-clock on one machine. The table scores the teacher (Heun, 35 NFE) and the one-step
students on the same noise seeds and sample count, and, since BOOT learns the teacher's own ODE path from each
noise, the RMS distance between each student's sample and the teacher's 35-NFE sample from the same noise (KD,
whose student regresses onto such pairs, committed by benchmarks/reflow.py, for scale). Results:
benchmarks/results/boot.json (+ the BOOT FD curve), the BOOT student in benchmarks/results/students/boot-digits.
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
# BOOT's settings: the teacher's own sampler as the path (Heun, the 18-step Karras grid: its 35-NFE samples),
# batch 128 as SiD's digits run, the loop's 20-kimg EMA. Trials (10-12 minutes, one core, two at a time; in-run FD
# at n = 1000, noise seed 0, the teacher there 0.566; at 12 / 24 / 36 / 48 / 60 / 84 kimg): Adam lr 1e-4 6.41 / 3.75 /
# 2.91 / 2.36 / 2.58 / 2.26, 1.96 at 136; lr 3e-4 3.65 / 3.12 / 2.52 / 2.27 / 2.31 / 2.08; σ_init 80 (the student
# reads σ_max·ε, where the path starts, as BOOT's VP student reads x_T = ε) instead of SiD's 2.5, lr 1e-4, 6.76 /
# 3.79 (stopped). At 136 kimg (lr 1e-4) the student's signal, against the teacher's own path from the same 500
# noises, is off by an RMS of 0.015-0.024 for σ_p from 57 down to 3.3, 0.066 at 1.1, 0.15 at 0.3 and 0.20 at 0 (the
# path's RMS size there: 0.70, 0.79, 0.85): the error builds up over the low-σ steps, where the teacher's step
# carries the student's error from one grid point to the next almost unchanged.
BOOT_OPTIONS = ("--batch-size", "128", "--lr", "3e-4", "--steps", "18", "--solver", "heun")
EVAL_EVERY = 12.0
KD_STUDENT = "benchmarks/results/students/kd-digits"  # benchmarks/reflow.py --only digits-kd (28 minutes, 20000 pairs)
MIXTURE, MIXTURE_INIT, MIXTURE_MINUTES, MIXTURE_N = "ring8", "8gaussians", 6.0, 20000
MIXTURE_OPTIONS = ("--batch-size", "256", "--lr", "3e-4", "--ema-halflife-kimg", "20", "--snapshot-every-kimg", "200",
                   "--checkpoint-every-kimg", "200")


def run_boot(minutes: float) -> dict:
    run = RUNS / "boot-digits"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("boot", str(SHIPPED / DATA), run, minutes, *BOOT_OPTIONS, eval_n=N, eval_every=EVAL_EVERY)
    return {"distill": info, "student_checkpoint": _ship_student(run, "boot-digits"), "curve": read_curve(run)}


def rms_to_teacher(models: dict, n: int, seeds) -> dict:
    """Per model, the RMS distance (per value) between its samples and the teacher's Heun-18 samples from the same
    noise, at each seed (one-step generators and the teacher's samplers start from the same z for a seed)."""
    from fewstep.model import load_model

    teacher = load_model(SHIPPED / DATA)
    ref = {s: teacher.sample(n, seed=s, sampler="heun", steps=18).x for s in seeds}
    out = {}
    for label, path in models.items():
        student = load_model(path)
        by_seed = {str(s): float((student.sample(n, seed=s).x - ref[s]).pow(2).mean().sqrt()) for s in seeds}
        out[label] = {"by_seed": by_seed, "mean": sum(by_seed.values()) / len(by_seed)}
        print(label, "RMS to the teacher's samples", [round(v, 4) for v in by_seed.values()], flush=True)
    return out


def table(results: dict) -> dict:
    boot = ROOT / results["digits"]["student_checkpoint"]
    sid = ROOT / results["digits-sid"]["run"]
    kd = ROOT / KD_STUDENT
    rows = {"teacher (Heun)": (SHIPPED / DATA, {"sampler": "heun", "steps": 18}), "SiD": (sid, {}), "BOOT": (boot, {})}
    if kd.is_dir():
        rows["KD (committed, benchmarks/reflow.py)"] = (kd, {})
    out, key = fd_rows_by_seed(rows, N, SEEDS)
    rms = rms_to_teacher({k: v[0] for k, v in rows.items() if k != "teacher (Heun)"}, N, SEEDS)
    runs = {"BOOT": results["digits"], "SiD": results["digits-sid"]}
    table = fd_table(out, key, N, SEEDS, lambda label: runs.get(label, {}).get("distill", {}),
                     extra=("RMS to the teacher's sample, mean",
                            lambda label: f"{rms[label]['mean']:.4f}" if label in rms else "–"))
    return {"fd_key": key, "n_samples": N, "seeds": list(SEEDS), "rows": out, "rms_to_teacher": rms, "table": table}


def plot(results: dict) -> str:
    from fewstep.eval.plots import plot_curves

    curve = results["digits"]["curve"]
    key = next(k for k in curve[0] if k.startswith("fd_") and "floor" not in k)
    teacher = _eval(SHIPPED / DATA, N, seed=0, sampler="heun", steps=18)
    xs = [r["kimg"] for r in curve]
    path = RESULTS / "boot_digits_fd_curve.png"
    series = {"BOOT student (1 NFE, EMA)": (xs, [r[key] for r in curve])}
    sid_run = ROOT / results["digits-sid"]["run"]
    if (sid_run / "metrics.jsonl").is_file():
        sc = read_curve(sid_run)
        series["SiD student (1 NFE, EMA), same minutes"] = ([r["kimg"] for r in sc], [r[key] for r in sc])
    series["teacher Heun (35 NFE)"] = (xs, [teacher[key]] * len(xs))
    plot_curves(series, path, xlabel="images seen (kimg)", ylabel=f"FD ({key[3:]}, n={N}, seed 0)", logy=True,
                title="BOOT on digits: FD vs images seen")
    return str(path.relative_to(ROOT))


def table_and_plot(results: dict) -> dict:
    return {**table(results), "curve_plot": plot(results)}


def run_mixture(minutes: float) -> dict:
    """BOOT on the exact ring8 teacher: exact log-likelihood and mode coverage of its one-step samples against the
    teacher's 35-NFE Heun samples (same n and noise seed), and the RMS distance between the two from the same noise."""
    from fewstep.model import load_model, mixture_model

    run = RUNS / f"boot-mixture-{MIXTURE}"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("boot", f"mixture:{MIXTURE}", run, minutes, "--init", str(SHIPPED / MIXTURE_INIT),
                    *MIXTURE_OPTIONS)
    rows = {"teacher (exact, Heun)": _pick(_eval(f"mixture:{MIXTURE}", MIXTURE_N, sampler="heun", steps=18)),
            "BOOT": _pick(_eval(run, MIXTURE_N))}
    a = load_model(run).sample(MIXTURE_N, seed=1).x
    b = mixture_model(MIXTURE).sample(MIXTURE_N, seed=1, sampler="heun", steps=18).x
    rms = float((a - b).pow(2).mean().sqrt())
    for label, r in rows.items():
        print(label, r["nfe"], round(r["log_likelihood"], 4), r["mode_coverage"], flush=True)
    print("RMS BOOT − teacher", round(rms, 4), "teacher std", round(float(b.std()), 4), flush=True)
    return {"mixture": MIXTURE, "distill": info, "n_samples": MIXTURE_N, "seed": 1, "rows": rows,
            "rms_to_teacher": rms, "teacher_std": float(b.std())}


def main() -> None:
    parts = {"digits": lambda m: run_boot(m or MINUTES),
             "digits-sid": lambda m: side_by_side_sid("boot-bench-sid-digits", m or MINUTES),
             "mixture": lambda m: run_mixture(m or MIXTURE_MINUTES),
             "table": lambda m: table_and_plot(json.loads((RESULTS / "boot.json").read_text()))}
    bench_main(__doc__, "boot.json", "boot.py", parts, ["digits", "table"],
               f"override the training budget (digits: {MINUTES:g}, mixture: {MIXTURE_MINUTES:g})")


if __name__ == "__main__":
    main()
