"""Rectified flow by reflow: a 2-rectified flow against its teacher and against knowledge distillation.

    python benchmarks/reflow.py --only pairs                           # the digits teacher's (noise, sample) pairs
    FEWSTEP_THREADS=1 python benchmarks/reflow.py --only digits        # 28 minutes of reflow on one core
    FEWSTEP_THREADS=1 python benchmarks/reflow.py --only digits-kd     # at the same time on the other core: KD
                                                                       # on the same pairs
    FEWSTEP_THREADS=1 python benchmarks/reflow.py --only digits-rf-kd  # then KD of the 2-rectified flow (its own
                                                                       # pairs, 4 Euler steps), same budget
    python benchmarks/reflow.py --only table                           # teacher, reflow and KD at noise seeds 1-3
    python benchmarks/reflow.py --only mixture                         # exact ring8 teacher: log-likelihood and
                                                                       # straightness at 1/2/4 Euler steps

Reflow and KD train on the same teacher pairs (generated once, timed apart), side by side, one core each, the
same 28 minutes: KD regresses a one-step generator on the pairs, reflow trains a flow on the pairs' straight
lines, sampled with k Euler steps. The table scores the teacher (Heun, 35 NFE, and Euler on the flow's time
grid at 1/2/4 steps: what the teacher does with the reflowed model's sampler), the 2-rectified flow at 1/2/4
Euler steps and the KD student on the same noise seeds and sample count, with the straightness of the teacher's
and the reflowed model's trajectories. Results: benchmarks/results/reflow.json, the reflowed model in
benchmarks/results/students/reflow-digits.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, read_curve, run_parts, threads  # noqa: E402
from sid import SHIPPED, _distill, _eval, _pick, _ship_student, fd_rows_by_seed  # noqa: E402

DATA, N, MINUTES, SEEDS, STEPS = "digits", 1000, 28.0, (1, 2, 3), (1, 2, 4)
N_PAIRS = 20000
PAIRS = RUNS / "reflow-digits-pairs.safetensors"
# Both methods' settings: batch 128 as the other digits benchmarks, Adam lr 4e-4, EMA half-life 5 kimg. Six-minute
# trials on these pairs (one core each, two at a time; in-run FD at n = 500, seed 0, at 60 / 120 kimg): reflow lr 1e-4
# 3.57 / 2.40, lr 4e-4 2.12 / 1.77, lr 1e-3 1.95 / 1.66 (n = 1000, seed 1, at 1 / 2 / 4 Euler steps: 4e-4 1.51 /
# 1.03 / 0.83, 1e-3 1.40 / 1.00 / 0.82); KD lr 4e-4 1.72 / 1.53 (seed 1: 1.28). One lr for both: 4e-4.
OPTIONS = ("--batch-size", "128", "--lr", "4e-4", "--ema-halflife-kimg", "5")
EVAL_EVERY = 12.0
MIXTURE, MIXTURE_INIT, MIXTURE_MINUTES, MIXTURE_N = "ring8", "8gaussians", 6.0, 20000
MIXTURE_OPTIONS = ("--batch-size", "256", "--lr", "1e-3", "--ema-halflife-kimg", "20", "--n-pairs", "20000",
                   "--snapshot-every-kimg", "200", "--checkpoint-every-kimg", "200")
STRAIGHTNESS_N, STRAIGHTNESS_STEPS = 1000, 100
RF_PAIR_STEPS = 4  # Euler steps of the 2-rectified flow's own pairs for the KD that follows it


def make_pairs() -> dict:
    """The digits teacher's pairs (its own recipe: Heun, 18 steps, 35 NFE), once for both distillations."""
    import torch

    from fewstep.methods.kd import generate_pairs, load_pairs
    from fewstep.model import load_model

    PAIRS.unlink(missing_ok=True)
    shutil.rmtree(PAIRS.with_name(PAIRS.name + ".parts"), ignore_errors=True)
    t0 = time.perf_counter()
    generate_pairs(load_model(SHIPPED / DATA), PAIRS, N_PAIRS, chunk=1000, progress=False)
    secs = time.perf_counter() - t0
    _, meta = load_pairs(PAIRS)
    print(f"{N_PAIRS} pairs in {secs:.0f}s ({threads()} threads)", flush=True)
    return {"n": N_PAIRS, "seconds": round(secs, 1), "threads": threads(), "recipe": meta["recipe"],
            "path": str(PAIRS.relative_to(ROOT)), "torch_threads": torch.get_num_threads()}


def run_digits(method: str, minutes: float) -> dict:
    if not PAIRS.is_file():
        raise SystemExit(f"{PAIRS} is missing: run `python benchmarks/reflow.py --only pairs` first")
    run = RUNS / f"{method}-digits-on-reflow-pairs"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill(method, str(SHIPPED / DATA), run, minutes, "--pairs", str(PAIRS), "--n-pairs", str(N_PAIRS),
                    "--chunk", "1000", *OPTIONS, eval_n=N, eval_every=EVAL_EVERY)
    curve = read_curve(run)
    return {"distill": info, "student_checkpoint": _ship_student(run, f"{method}-digits"), "curve": curve}


def run_kd_of_flow(minutes: float) -> dict:
    """The paper's last step: a one-step generator distilled (KD) from the 2-rectified flow's own pairs, made by
    its Euler sampler at RF_PAIR_STEPS steps, with KD's settings and budget of the run on the teacher's pairs."""
    src = RUNS / "reflow-digits-on-reflow-pairs"
    if not (src / "model").is_dir():
        raise SystemExit(f"{src} is missing: run `--only digits` first")
    run = RUNS / "kd-of-reflow-digits"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("kd", str(src), run, minutes, "--data", DATA, "--n-pairs", str(N_PAIRS), "--chunk", "1000",
                    "--steps", str(RF_PAIR_STEPS), *OPTIONS, eval_n=N, eval_every=EVAL_EVERY)
    from fewstep.methods.kd import load_pairs

    _, meta = load_pairs(run / "pairs.safetensors")
    curve = read_curve(run)
    return {"distill": info, "pairs": {"n": meta["n"], "recipe": meta["recipe"],
                                       "seconds": meta.get("seconds_this_process")},
            "student_checkpoint": _ship_student(run, "kd-of-reflow-digits"), "curve": curve}


def straightness_of(path) -> dict:
    from fewstep.eval.straightness import model_straightness
    from fewstep.model import load_model

    return model_straightness(load_model(path), STRAIGHTNESS_N, seed=1, steps=STRAIGHTNESS_STEPS)


def table(results: dict) -> dict:
    rf = ROOT / results["digits"]["student_checkpoint"]
    kd = ROOT / results["digits-kd"]["student_checkpoint"]
    rows = {"teacher (Heun)": (SHIPPED / DATA, {"sampler": "heun", "steps": 18})}
    for k in STEPS:
        rows[f"teacher (Euler, flow grid, {k})"] = (SHIPPED / DATA, {"sampler": "euler", "steps": k,
                                                                     "schedule": "flow"})
    for k in STEPS:
        rows[f"2-rectified flow (Euler, {k})"] = (rf, {"steps": k})
    rows["KD"] = (kd, {})
    if "digits-rf-kd" in results:
        rows["KD of the 2-rectified flow"] = (ROOT / results["digits-rf-kd"]["student_checkpoint"], {})
    out, key = fd_rows_by_seed(rows, N, SEEDS)
    straight = {"teacher": straightness_of(SHIPPED / DATA), "2-rectified flow": straightness_of(rf)}
    print("straightness", straight, flush=True)
    lines = [f"| model | NFE | kimg | {key} (n = {N}) seeds {', '.join(map(str, SEEDS))} | mean |", "|---|---|---|---|---|"]
    for label, r in out.items():
        d = {"KD": results["digits-kd"], "KD of the 2-rectified flow": results.get("digits-rf-kd")}.get(
            label, results["digits"] if label.startswith("2-") else {})
        kimg = round(d["distill"]["kimg"]) if d else "–"
        lines.append(f"| {label} | {r['nfe']} | {kimg} | "
                     + " / ".join(f"{r['by_seed'][str(s)][key]:.3f}" for s in SEEDS) + f" | {r['fd_mean']:.3f} |")
    return {"fd_key": key, "n_samples": N, "seeds": list(SEEDS), "rows": out, "straightness": straight,
            "straightness_protocol": f"{STRAIGHTNESS_N} noises (seed 1), {STRAIGHTNESS_STEPS} Euler steps on the "
                                     "flow's uniform t grid from σ = 80",
            "table": "\n".join(lines)}


def run_mixture(minutes: float) -> dict:
    """Reflow of the exact ring8 teacher (from the shipped MLP as --init): exact log-likelihood and mode coverage at
    1/2/4 Euler steps, against the teacher's Heun (35 NFE) and the teacher's own Euler steps on the same grid."""
    run = RUNS / f"reflow-mixture-{MIXTURE}"
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("reflow", f"mixture:{MIXTURE}", run, minutes, "--init", str(SHIPPED / MIXTURE_INIT),
                    *MIXTURE_OPTIONS)
    teacher = f"mixture:{MIXTURE}"
    rows = {"teacher (exact, Heun)": _pick(_eval(teacher, MIXTURE_N, sampler="heun", steps=18))}
    for k in STEPS:
        rows[f"teacher (exact, Euler, flow grid, {k})"] = _pick(_eval(teacher, MIXTURE_N, sampler="euler", steps=k,
                                                                      schedule="flow"))
    for k in STEPS:
        rows[f"2-rectified flow (Euler, {k})"] = _pick(_eval(run, MIXTURE_N, steps=k))
    for label, r in rows.items():
        print(label, r["nfe"], round(r["log_likelihood"], 4), r["mode_coverage"], flush=True)
    straight = {"teacher": straightness_of(teacher), "2-rectified flow": straightness_of(run)}
    print("straightness", straight, flush=True)
    return {"mixture": MIXTURE, "distill": info, "n_samples": MIXTURE_N, "seed": 1, "rows": rows,
            "straightness": straight}


def plot(results: dict) -> str:
    from fewstep.eval.plots import plot_curves

    curves = {"2-rectified flow (1 Euler step, EMA)": results["digits"]["curve"],
              "KD (1 NFE, EMA)": results["digits-kd"]["curve"]}
    key = next(k for k in curves["KD (1 NFE, EMA)"][0] if k.startswith("fd_") and "floor" not in k)
    teacher = _eval(SHIPPED / DATA, N, seed=0, sampler="heun", steps=18)
    if "digits-rf-kd" in results:
        curves["KD of the 2-rectified flow (1 NFE, EMA)"] = results["digits-rf-kd"]["curve"]
    lines = {label: ([r["kimg"] for r in c], [r[key] for r in c]) for label, c in curves.items()}
    xs = sorted({x for v in lines.values() for x in v[0]})
    lines["teacher Heun (35 NFE)"] = (xs, [teacher[key]] * len(xs))
    path = RESULTS / "reflow_digits_fd_curve.png"
    plot_curves(lines, path, xlabel="images seen (kimg)", ylabel=f"FD ({key[3:]}, n={N}, seed 0)", logy=True,
                title="reflow and KD on the same digits pairs: FD vs images seen")
    return str(path.relative_to(ROOT))


def table_and_plot(results: dict) -> dict:
    return {**table(results), "curve_plot": plot(results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["pairs", "digits", "digits-kd", "table"],
                    choices=["pairs", "digits", "digits-kd", "digits-rf-kd", "table", "mixture"])
    ap.add_argument("--minutes", type=float, default=None, help=f"override the training budget (digits: {MINUTES:g}, "
                    f"mixture: {MIXTURE_MINUTES:g})")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(threads())
    parts = {"pairs": lambda m: make_pairs(), "digits": lambda m: run_digits("reflow", m or MINUTES),
             "digits-kd": lambda m: run_digits("kd", m or MINUTES),
             "digits-rf-kd": lambda m: run_kd_of_flow(m or MINUTES),
             "mixture": lambda m: run_mixture(m or MIXTURE_MINUTES),
             "table": lambda m: table_and_plot(json.loads((RESULTS / "reflow.json").read_text()))}
    run_parts("reflow.json", "reflow.py", parts, args.only, args.minutes)


if __name__ == "__main__":
    main()
