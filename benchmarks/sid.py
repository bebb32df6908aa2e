"""SiD benchmarks (issue "SiD"): one-step students against their teachers.

    python benchmarks/sid.py --only mixture --minutes 12   # exact mixture teachers (≈ 40 min; --presets ring8 grid25 grid25-reference)
    python benchmarks/sid.py --only mnist5k      # FD vs images seen, ≤ 30 CPU-minutes of SiD
    FEWSTEP_THREADS=1 python benchmarks/sid.py --only digits   # the same on digits, on one core (Diff-Instruct warm start)
    FEWSTEP_THREADS=1 python benchmarks/sid.py --only digits-seed1   # ... with training seed 1 (also 2, 3), other core
    FEWSTEP_THREADS=1 python benchmarks/sid.py --only digits-reference   # its ablation (constant t_max), other core
    FEWSTEP_THREADS=1 python benchmarks/sid.py --only digits-sida   # adversarial SiD (reads real images), same budget
    FEWSTEP_THREADS=1 python benchmarks/sid.py --only digits-di-warm100   # Diff-Instruct's 100 kimg, then SiD
    python benchmarks/sid.py --only compare      # SiD vs Diff-Instruct vs DMD, equal wall-clock, one table
    python benchmarks/sid.py --only cost         # SiD iteration time / teacher-training step, same batch
    python benchmarks/sid.py --only seeds --runs mnist5k   # a committed student vs its teacher at noise seeds 1-3
    python benchmarks/sid.py --only wide --runs digits digits-seed1   # noise seeds 1-10 and a 5000-sample FD
    python benchmarks/sid_mixture_diagnosis.py --preset grid25   # after the mixture part: why a student misses

Every number states NFE, sample count and wall-clock; results go to
benchmarks/results/sid*.json (+ plots), final students to benchmarks/results/students/.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, environment, fewstep, read_curve, threads, write_json  # noqa: E402

SHIPPED = ROOT / "fewstep" / "assets" / "teachers"
LIKELIHOOD_TOLERANCE = 0.05  # "within 5%": |Δ mean log-likelihood| ≤ ln(1.05) nats (likelihood ratio)


def _eval(path_or_model, n, seed=1, **kw):
    from fewstep.eval.runner import evaluate_model
    from fewstep.model import load_model

    model = load_model(path_or_model) if not hasattr(path_or_model, "sample") else path_or_model
    return evaluate_model(model, n=n, seed=seed, **kw)


def _ship_student(run: Path, name: str) -> str:
    dest = RESULTS / "students" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "model", dest)
    return str(dest.relative_to(ROOT))


def _distill(method: str, teacher: str, out: Path, minutes: float, *extra: str, eval_n: int = 0,
             eval_every: float = 0.0) -> dict:
    args = ["distill", method, "--teacher", teacher, "--out", str(out), "--total-kimg", "100000",
            "--max-minutes", str(minutes), "--no-progress", *extra]
    if eval_n:
        args += ["--eval-n", str(eval_n), "--eval-every-kimg", str(eval_every)]
    wall = fewstep(*args)
    summary = json.loads((out / "summary.json").read_text())
    return {"command": "fewstep " + " ".join(args).replace(str(ROOT) + "/", ""), "wall_seconds": round(wall, 1),
            **{k: summary[k] for k in ("kimg", "iterations", "train_seconds", "eval_seconds", "sec_per_iter",
                                       "nonfinite_losses")}}


# ---- exact mixture teachers ------------------------------------------------------------------------
MIXTURES = {"ring8": "8gaussians", "grid25": "25gaussians"}  # exact teacher preset: its shipped MLP initialisation
MIXTURE_BATCH = 256
# per-run options on top of the shared ones: run name → (exact mixture, options). grid25's tight modes stall the
# reference estimator (benchmarks/sid_mixture_diagnosis.py: the generator itself reaches the teacher in a few
# hundred exact reverse-KL steps): in 2-D the per-sample ω = mean over 2 coordinates comes near 0 and 1/ω has an
# infinite variance. ω pooled over the 32 σ-nearest samples and antithetic noise pairs tame the gradient's
# variance, and lr_g 3e-4 then works (with the reference estimator too; 1e-3 is too fast); t_max 500 (σ ≤ 2.5,
# 42% of the σ draws below 0.1 instead of 26%) went further in 12-minute trials than 800, 2 fake updates per
# generator update or pooling over the whole batch. "grid25-reference" is the same run with the reference's
# per-sample ω and independent noise: the ablation, side by side. A run named after its mixture is that
# mixture's benchmark (its student is committed); any other name is an ablation (its student is not).
MIXTURE_RUNS = {
    "ring8": ("ring8", ("--lr-g", "1e-4", "--lr-fake", "1e-4")),
    "grid25": ("grid25", ("--lr-g", "3e-4", "--lr-fake", "1e-3", "--alpha", "1.0", "--t-max", "500",
                          "--omega-pool", "32", "--antithetic")),
    "grid25-reference": ("grid25", ("--lr-g", "3e-4", "--lr-fake", "1e-3", "--alpha", "1.0", "--t-max", "500")),
}


def mixture_lr_g(run: str) -> float:
    """The generator learning rate of a mixture run (sid_mixture_diagnosis.py --from-init uses it)."""
    opts = MIXTURE_RUNS[run][1]
    return float(opts[opts.index("--lr-g") + 1])


def bench_mixture(minutes: float, presets=tuple(MIXTURE_RUNS)) -> dict:
    out = {}
    for preset in presets:
        mixture, options = MIXTURE_RUNS[preset]
        data = MIXTURES[mixture]
        run = RUNS / f"sid-mixture-{preset}"
        shutil.rmtree(run, ignore_errors=True)
        info = _distill("sid", f"mixture:{mixture}", run, minutes, "--init", str(SHIPPED / data),
                        "--batch-size", str(MIXTURE_BATCH), *options,
                        "--ema-halflife-kimg", "20", "--lr-decay-kimg", "500", "--snapshot-every-kimg", "200", "--checkpoint-every-kimg", "200",
                        eval_n=5000, eval_every=100.0)
        n = 20000
        teacher = _eval(f"mixture:{mixture}", n, sampler="heun", steps=18)
        student = _eval(run, n)
        init = _eval(SHIPPED / data, n, sampler="heun", steps=18)
        gap = student["log_likelihood"] - teacher["log_likelihood"]
        out[preset] = {
            "mixture": mixture, "distill": info, "n_samples": n,
            "teacher_exact_heun35": _pick(teacher), "student_sid_1nfe": _pick(student),
            "init_mlp_teacher_heun35": _pick(init),
            "loglik_gap_nats": gap, "likelihood_ratio": float(math.exp(gap)),
            "within_5pct": abs(gap) <= math.log(1 + LIKELIHOOD_TOLERANCE),
            "all_modes_covered": student["mode_coverage"] == 1.0,
            "student_checkpoint": _ship_student(run, f"sid-{preset}") if preset == mixture else None,
            "curve": [{"kimg": r["kimg"], "train_seconds": r["train_seconds"], "log_likelihood": r["log_likelihood"],
                       "mode_coverage": r["mode_coverage"]}
                      for r in read_curve(run)],
            "curve_n": 5000, "curve_seed": 0,
        }
        out[preset]["curve_plot"] = plot_mixture_curve(preset, out[preset])
        print(json.dumps({preset: {k: v for k, v in out[preset].items() if k != "distill"}}, indent=1), flush=True)
    return out


def plot_mixture_curve(preset: str, res: dict) -> str:
    """Exact log-likelihood of the one-step student vs images seen (in-run evaluations), against the
    exact teacher's 35-NFE Heun samples and the 5% band around them."""
    from fewstep.eval.plots import plot_curves

    xs = [r["kimg"] for r in res["curve"]]
    t = res["teacher_exact_heun35"]["log_likelihood"]
    band = math.log(1 + LIKELIHOOD_TOLERANCE)
    plot = RESULTS / f"sid_{preset}_loglik_curve.png"
    plot_curves({"SiD student (1 NFE, EMA)": (xs, [r["log_likelihood"] for r in res["curve"]]),
                 "exact teacher, Heun (35 NFE)": (xs, [t] * len(xs)),
                 "teacher − ln 1.05": (xs, [t - band] * len(xs))},
                plot, xlabel="images seen (kimg)", ylabel=f"mean log-likelihood (n={res['curve_n']}, seed 0)",
                title=f"SiD on mixture:{res['mixture']}" + ("" if preset == res["mixture"] else f" ({preset})"))
    return str(plot.relative_to(ROOT))


def _pick(r: dict) -> dict:
    keep = ("nfe", "n_samples", "sample_seconds", "samples_per_second", "log_likelihood", "ref_log_likelihood",
            "mode_coverage", "balance_tv", "mmd_rbf", "sliced_wasserstein", "n_floor")
    return {k: v for k, v in r.items() if k in keep or k.startswith(("fd_", "kid_", "precision_", "recall_",
                                                                      "class_max_dev_"))}



def fd_rows_by_seed(rows: dict, n: int, seeds) -> tuple[dict, str]:
    """Each labelled model, sampled with its options (``{label: (path, evaluate_model options)}``), at each noise
    seed: ``({label: {"nfe", "by_seed", "fd_mean", "samples_per_second_seed1"}}, the FD key)``."""
    out, key = {}, None
    for label, (path, kw) in rows.items():
        by_seed = {}
        for seed in seeds:
            r = _eval(path, n, seed=seed, **kw)
            key = key or next(k for k in r if k.startswith("fd_") and "floor" not in k)
            by_seed[str(seed)] = _pick(r)
        fds = [by_seed[str(s)][key] for s in seeds]
        first = by_seed[str(seeds[0])]
        out[label] = {"nfe": first["nfe"], "by_seed": by_seed, "fd_mean": sum(fds) / len(fds),
                      "samples_per_second_seed1": first["samples_per_second"]}
        print(label, [round(v, 4) for v in fds], flush=True)
    return out, key


def fd_table(out: dict, key: str, n: int, seeds, distill_of, extra: tuple | None = None) -> str:
    """Markdown of :func:`fd_rows_by_seed`'s rows: NFE, the run's kimg and seconds per iteration (``distill_of(label)``:
    its distill record, {} for a row not trained here), FD at each seed and their mean; ``extra`` = (header,
    cell(label)) adds a last column."""
    head = f"| model | NFE | kimg | s per iteration | {key} (n = {n}) seeds {', '.join(map(str, seeds))} | mean |"
    lines = [head + (f" {extra[0]} |" if extra else ""), "|---" * (7 if extra else 6) + "|"]
    for label, r in out.items():
        d = distill_of(label)
        lines.append(f"| {label} | {r['nfe']} | {round(d['kimg']) if d else '–'} | "
                     f"{round(d['sec_per_iter'], 2) if d else '–'} | "
                     + " / ".join(f"{r['by_seed'][str(s)][key]:.3f}" for s in seeds) + f" | {r['fd_mean']:.3f} |"
                     + (f" {extra[1](label)} |" if extra else ""))
    return "\n".join(lines)

# ---- image teachers --------------------------------------------------------------------------------
# per-run settings: run name → teacher data, budget, FD sample count, in-run eval interval, batch, lr, options.
# digits: batch 128 went furthest in 10-minute trials (FD 1.25 at 150 kimg vs 1.50 for batch 32, whose curve
# turns back up after ~110 kimg; batch 256, lr 1e-4, a 4× faster fake score with α = 1.0, inverse-sqrt lr decay
# and --dropout 0 did not do better); n = 1000 of its 1497 training images as the FD reference, because at n = 300
# the teacher's own FD moves from 0.88 to 1.83 between noise seeds. At the reference's constant t_max 800 (σ ≤ 24)
# the digits student plateaus above the teacher (in-run FD, seed 0, 0.72–0.86 from 400 to 700 kimg of a 70-minute
# run; resumed from its 676-kimg state for 80 kimg: lr 1e-5 instead of 5e-5 0.74, unchanged 0.75, t_max 300 0.79,
# t_max 500 (σ ≤ 2.5) 0.645 — the teacher there: 0.566). From the start t_max 500 is slower (1.64 vs 1.36 at
# 96 kimg: the layout is learnt at large σ). 28-minute trials of the switch: at 150 kimg 0.80 at 295 kimg (the
# reference: 0.97 at 288, 0.87 at 396); at 240 kimg 0.88 at 288; a ramp over 60–240 kimg 1.10–1.20 at 150–192
# (the reference: 0.95–1.00). Hence t_max 800, then 500 from 150 kimg (now "digits-tmax-switch").
# Later 28-minute trials (not benchmarks; in-run FD, seed 0, teacher 0.566; none of these ends clearly below that
# run's 0.82 at ~300 kimg): constant t_max 650 (σ ≤ 8.6) is ahead of 800 at every point
# (0.92 vs 1.00 at 150 kimg, 0.76 vs 0.84 at 252) but ends 0.81 at 267; 650 → 500 at 150 kimg 0.95 at 298, at 200
# kimg 0.75 at 258 then 0.86 at 298. lr 1e-4 (t_max 650) is faster early (0.84 at 120) and lowest of all (0.716 at
# 228) but ends 0.80 at 276; 2e-4 with inverse-sqrt decay from 50 kimg 0.75 at 150, then 0.99 at 240; two fake
# updates per generator update: no better per kimg, 35% slower per iteration. Every run's FD turns back up after its
# minimum (the generator oscillates; the 20-kimg EMA follows it): an EMA half-life of 100 kimg on the 2e-4 run kept
# falling to 0.756 at 276 (its 20-kimg EMA: 0.99–0.95) but turned up too, 0.797 at 301; lr 1e-4 with decay from 100
# kimg and a 50-kimg EMA 0.78 at 198, 0.80 at 234. A 100-kimg EMA from the start: lr 1e-4 levels off at 0.78–0.79
# from 228 to 294 kimg; lr 5e-5 lags (1.06 at 150, 0.85 at 300).
# "digits-reference" is the reference's constant t_max 800: the ablation. A run named after its data is that
# data's benchmark (its student is committed); any other name is an ablation, except another method's run
# ("method": its student is committed too, as METHOD-DATA).
# 2026-11-30: lr 1e-4, t_max 650 and a 100-kimg EMA (which levels off instead of turning up), then t_max 500 from
# 230 kimg, where that curve has levelled: 0.784 at 228, 0.751 at 276, 0.738 at 303 kimg (trial, seed 0). The
# previous settings (lr 5e-5, t_max 800 → 500 at 150 kimg) are kept as "digits-tmax-switch" (0.819 at 308).
# 2026-12-01, 28-minute trials on top of those settings (in-run FD, seed 0, teacher 0.566; the last two runs' tail
# samples, nearest-neighbour in digits-featnet, look grainy where the teacher's are smooth blobs): ω pooled over
# 16 σ-neighbours 1.00 at 150 kimg (those settings 0.88: stopped); --dropout 0 (the generator and fake score
# train without the teacher's dropout 0.1) 0.89 at 150, 0.709 at 310; --t-min 0.1 (no generator σ below 0.017,
# which was 15% of the draws) 0.94 at 150, 0.736 at 270, 0.704 at 292; --dropout 0 with the switch at 180 kimg
# 0.79 at 318; both --dropout 0 and --t-min 0.1 0.90 at 150, 0.793 at 317 (run as the benchmark: seeds 1/2/3
# 0.794 / 0.833 / 0.905, kept as "digits-t-min-no-dropout"), and with --lr-fake 2e-4 as well 0.945 at 313. So
# the two changes that each helped do not add up: between settings the end point moves by ~0.05–0.1, as much as
# these gains. The --t-min 0.1 trial run as the benchmark (runs are deterministic: it retraced the trial's curve
# exactly, 0.706 at 290 kimg) gave seeds 1/2/3 0.718 / 0.801 / 0.805, mean 0.775 against 0.757 for "digits":
# better at the in-run seed 0, worse on the mean of the other three, so "digits" keeps its settings and the run
# is kept as the ablation "digits-t-min".
# 2026-12-01, later: where an iteration's time goes (torch profiler, batch 128, one core): convolutions 71% (fp32
# at ~100 GFLOP/s, near this core's peak), dropout masks 7%, the rest norms and activations; torch.compile gained
# nothing after 155 s of compiling. bf16 autocast (--precision bf16) was 1.4x faster per iteration at batch 128
# alone in a profiling script, but in a 28-minute trial with --dropout 0, two runs at a time (0.58 s per
# iteration), the FD was 1.52 at 48 kimg, 1.34 at 96, 1.13 at 150 (fp32 --dropout 0: 0.89 at 150): it learns much
# less per image (stopped); "digits-bf16" is the "digits" run with only --precision bf16, as the benchmark: 0.56 s
# per iteration, 383 kimg in the 28 minutes (fp32: 0.71 s, 303 kimg), FD seeds 1/2/3 0.749 / 0.911 / 0.882 (mean
# 0.847 against 0.757). The teacher's stochastic samples are closer to the data than its ODE samples, so its
# score field leaves a one-step student room below the 35-NFE teacher (FD at n = 1000, noise seed 0 / 1: Heun 18
# steps 0.566 / 0.633, Heun 50 steps 0.535 / 0.578, ancestral DDIM (η = 1) 100 steps 0.555 / 0.311, 400 steps
# 0.479 / 0.279). Trials on the "digits" settings:
# --sigma-init 5 1.39 at 48 kimg (ahead), 1.13 at 96, 1.06 at 126 (behind: stopped); --alpha 1.0 1.61 at 48, 1.07
# at 126 (stopped).
# In the records below "digits" is the run now named "digits-plain" (the digits benchmark's settings until
# 2026-12-07); the entries they describe derive from it.
IMAGE_RUNS = {
    "mnist5k": {"data": "mnist5k", "minutes": 28.0, "n": 1000, "eval_every": 20.0, "batch": 32, "lr": "5e-5",
                "options": ()},
    "digits-plain": {"data": "digits", "minutes": 28.0, "n": 1000, "eval_every": 6.0, "batch": 128, "lr": "1e-4",
                     "options": ("--t-max", "650", "--ema-halflife-kimg", "100", "--t-max-end", "500",
                                 "--t-max-anneal-kimg", "230,230")},
}
IMAGE_RUNS["digits-t-min"] = {**IMAGE_RUNS["digits-plain"], "options": IMAGE_RUNS["digits-plain"]["options"] + ("--t-min", "0.1")}
IMAGE_RUNS["digits-t-min-no-dropout"] = {**IMAGE_RUNS["digits-t-min"],
                                         "options": IMAGE_RUNS["digits-t-min"]["options"] + ("--dropout", "0")}
IMAGE_RUNS["digits-bf16"] = {**IMAGE_RUNS["digits-plain"], "options": IMAGE_RUNS["digits-plain"]["options"] + ("--precision", "bf16")}
# 2026-12-01, last: the reference runs its fake score in eval mode (dropout off) inside the generator loss and
# samples the fake score's training batch with G in eval mode; fewstep ran both in train mode, so with the
# teacher's dropout 0.1 y_r − y_f carried the fake network's dropout noise. On the "digits" settings (28 minutes,
# one core; FD at n = 1000 for noise seeds 1/2/3, and of 5000 samples against all 1497 images, where the teacher's
# 35-NFE FD is 0.413 with 3000 samples; in brackets the "digits" run's in-run FD at seed 0):
# both reference modes (run as the benchmark) in-run 1.032 at 120 kimg (0.941), 0.708 at 305 (0.738), seeds
# 0.917 / 0.848 / 0.962, 5000 samples 0.642; the fake score in eval mode only (--fake-eval; G in train mode, so
# the fake score learns the x_g the generator loss sees) in-run 0.871 at 120 kimg (0.941), 0.689 at 216 (0.794),
# 0.568 at 312 (the teacher there: 0.566), seeds 0.704 / 0.821 / 0.802 (mean 0.776), 5000 samples 0.584;
# "digits" itself 0.608 with 5000 samples, and re-run with --seed 1 seeds 0.728 / 0.843 / 0.998 (mean 0.856):
# the training seed alone moves the seed mean by 0.1. A student's FD also moves by up to 0.3 between noise
# seeds (the --fake-eval student: 0.57 at seed 0, 0.82 at seed 2), so the in-run curve at seed 0 ranks settings
# poorly. --fake-eval is kept as the ablation "digits-fake-eval" (the default stays train mode until the
# benchmarks are re-run with it).
IMAGE_RUNS["digits-fake-eval"] = {**IMAGE_RUNS["digits-plain"], "options": IMAGE_RUNS["digits-plain"]["options"] + ("--fake-eval",)}
# 2026-12-01, ninth session, on a slower machine (2.0 GHz Xeon with AMX: a SiD iteration at batch 128 on one core
# took 1.2-1.4 s instead of 0.71, so 28 minutes reach ~150 kimg, not ~300; bf16 autocast was no faster there,
# 1.05x). Trials are compared by kimg (the t_max schedule follows kimg). In-run FD, seed 0: --antithetic 1.311 at
# 72 kimg ("digits" 1.192), SiDA with lr 1e-4 and these settings 1.596 at 72 (stopped); on top of --fake-eval
# (1.009 at 84, 0.834 at 132): --dropout 0 1.114 at 84 (stopped), --t-min 0.1 1.000 at 84, 0.832 at 132 (no
# gain). Two 90-minute runs of the "digits" settings with and without --fake-eval (in-run evaluations every 24
# kimg instead of 6, which alone moves a run's curve: the two swapped places against their committed 28-minute
# runs, 0.724 (train mode) vs 0.824 (--fake-eval) at 216 kimg), scored by noise seeds 1/2/3 at n = 1000 and by
# one FD of 5000 samples against all 1497 images (teacher: mean 0.629, 5000 samples 0.425; committed "digits"
# student 0.757, 0.708): train mode at 300 kimg 0.807 (0.748 / 0.823 / 0.850), 5000 samples 0.695, at 390
# 0.744 (0.679 / 0.742 / 0.811), 0.595, though its in-run seed-0 FD there was the teacher's (0.563 at 384 vs
# 0.566); --fake-eval at 300 0.817, 0.720, at 390 0.763, 0.668. So a third more images gains ~0.06 on the seed
# mean, the student stays above the teacher at every seed, and the seed-0 curve is no guide to the seed mean:
# settings are to be judged on several noise seeds (`fewstep eval --seeds 1 2 3`).
# 2026-12-01, tenth session, the same slow machine (1.1-1.3 s per iteration). Trials of the "digits" settings
# plus one change, evaluated every 24 kimg like the ninth session's 90-minute train-mode run, against which they
# are compared by kimg (in-run FD, seed 0, at 24 / 48 / 72 / 96 kimg; that run: 2.176 / 1.508 / 1.208 / 0.999,
# 0.916 at 120, 0.860 at 144): Adam β1 0.9 for both networks (the reference has a generator β1 option, default 0)
# 2.225 / 1.829 / 1.518; α 1.5 2.070 / 1.653 / 1.439; the fake score updated on every second iteration only (15%
# more kimg per minute) 2.294 / 1.734 / 1.514; the fake score's σ drawn like the generator loss's (the Karras ramp
# of t ~ U(0, t_max/1000): 8x more of its training at σ > 3.3, where the generator loss reads it and the
# log-normal rarely trains it) ahead early, 1.809 / 1.416, then behind, 1.245 / 1.141, and with t_max 800 1.921 /
# 1.584 / 1.270 / 1.089; the log-normal's std 1.6 instead of 1.2 2.024 / 1.519 / 1.275 / 1.176; the generator
# without dropout (the fake score keeping the teacher's 0.1) 2.079 / 1.450 / 1.338 / 1.239, 1.183 at 120; dropout
# 0.2 for both 2.115 / 1.658 / 1.328 / 1.181; σ_init 1.5 1.998 / 1.469 / 1.362. All stopped, none kept. Two
# diagnoses: a student sampled with its dropout on, the mode it trains in, is worse than in eval mode (seeds 1/2/3
# mean 0.942 vs 0.744 for that run at 390 kimg; 0.906 vs 0.757 for the committed "digits" student), so the
# eval-mode sampling is not what holds it back; and the teacher does not reproduce its training images (median
# distance of 1000 35-NFE samples to the nearest of the 1497 training images 2.27, against 2.05 for the 300
# held-out images; the committed student 2.22), so its low FD is not memorisation a one-step student cannot copy.
# How much more than the budget the criterion needs: that 90-minute run resumed from its 380-kimg state (same
# settings, 65 more minutes), snapshots scored as above (teacher: seeds 1/2/3 0.633 / 0.589 / 0.665, mean 0.629;
# 5000 samples 0.425): 450 kimg 0.595 / 0.724 / 0.753, mean 0.691, 5000 samples 0.579; 510 kimg mean 0.674,
# 0.543; 570 kimg 0.598 / 0.671 / 0.615, mean 0.628, 0.487; 630 kimg 0.678 / 0.611 / 0.604, mean 0.631, 0.492;
# 660 kimg 0.667 / 0.603 / 0.596, mean 0.622, 0.499 (below the teacher at 2 of 3 seeds at 570 kimg, 1 of 3 at
# 660). So on digits the one-step student reaches its teacher's seed mean at ~570 kimg, 1.9x the ~300 kimg that
# 28 minutes on one core gave on the faster machine, and levels off there: with 5000 samples it stays above.
# 2026-12-01, eleventh session, the slow machine again. The EMA is not what holds the student back: the EMA
# recurrence is linear, so a window average of the raw generator is (E_b − B·E_a)/(1 − B) from two EMA snapshots
# (B the product of the per-iteration betas between them); on that 90-minute run, windows ending at 300 kimg,
# 30 / 120 kimg wide, seed mean 0.797 / 0.765 (5000 samples 0.694 / 0.634) against the EMA's 0.807 (0.695); at
# 390 kimg 30 / 60 / 90 / 150 kimg wide 0.887 / 0.843 / 0.821 / 0.740 against 0.744; at 450, 510, 570 kimg 0.716,
# 0.686, 0.681 against 0.691, 0.674, 0.628. Two more trials (in-run FD, seed 0, at 24 / 48 / 72 / 96 / 120 kimg;
# that run 2.176 / 1.508 / 1.208 / 0.999 / 0.916): --lr-fake 2e-4 2.080 / 1.471 / 1.282 / 1.181 / 1.168; Adam β2
# 0.99 for both networks 2.167 / 1.601 / 1.344 / 1.125 / 1.049 (both stopped). Images per second saturate at
# batch 128 (one core: 2.65 ms per image for a fwd+bwd of the digits net at 128, 2.74 at 256 and 512).
# 2026-12-02, seventeenth session, the slow machine (SiD 1.3 s per iteration at batch 128 on one core, two runs at a
# time). Diff-Instruct with SiD's digits lr and batch (benchmarks/sds.py's run) is ahead of SiD per kimg (in-run FD,
# seed 0, every 12 kimg: 2.244 / 1.538 / 1.243 / 1.088 at 12 / 24 / 36 / 48 kimg; the "digits" run 2.895 / 2.227 /
# 1.72 / 1.435) and cheaper per iteration (no backward through the two networks). Is it the σ law? SiD with the
# generator loss's σ log-normal (a trial script patching generator_draws; lr 1e-4, batch 128, 20-kimg EMA):
# Diff-Instruct's ln σ ~ N(−1.2, 1.2²) 3.182 / 2.554 / 2.002 / 1.758, N(0, 1.2²) 2.619 / 1.931 / 1.581 / 1.437
# (stopped at 48 kimg). So not the σ law. The "digits" settings with SiD's loss and ω but the networks' inputs
# detached (its gradient is then −(y_r − y_f)/ω: Diff-Instruct's direction under SiD's σ law and weighting; a
# trial script passing through_networks=False; 1.0 s per iteration instead of 1.3) 2.975 / 2.270 / 1.837 / 1.536
# at 6 / 12 / 18 / 24 kimg, 1.261 at 36, 0.979 at 60, 0.936 at 66 (SiD: 1.72 at 36, 1.26 at 60; Diff-Instruct
# 0.949 at 60): on digits the terms through the networks' inputs are what slow SiD down early. "digits-di"
# (Diff-Instruct, 28 minutes, below) fell to 0.686 at 138-144 kimg, then turned up (0.85-0.91 at 162-180) as SiD's
# runs do, and ended at seeds 1/2/3 0.819 / 1.022 / 1.011 (mean 0.951; SiD on this machine, 28 minutes beside
# BOOT: 1.011). Untried: a detached warm start (the faster early descent) then the full SiD loss.
IMAGE_RUNS["digits-tmax-switch"] = {**IMAGE_RUNS["digits-plain"], "lr": "5e-5",
                                    "options": ("--t-max-end", "500", "--t-max-anneal-kimg", "150,150")}
IMAGE_RUNS["digits-reference"] = {**IMAGE_RUNS["digits-plain"], "lr": "5e-5", "options": ()}
# "digits-sida": adversarial SiD (`fewstep distill sida`; it also reads the 1497 training images) on the same
# budget. 28-minute trials (in-run FD, seed 0): the reference's weights (discriminator 1, GAN 1e-4 of SiD) with
# its gradient clip and without it follow the same curve to ~120 kimg (1.54, 1.55); without it the FD falls
# steadily (0.98 at 216, 0.78 at 276, 0.756 at 288, 0.764 at 300) with no SiD-like turn upwards, with it it falls
# slower (1.04 at 210, 0.87 at 276: so the clip is off by default); a 100× discriminator and 10× GAN weight is ahead
# early (2.13 vs 2.19 at 60 kimg) but levels off (with the clip 0.92 from 240, 0.90 at 297; without 0.90 at 276).
IMAGE_RUNS["digits-sida"] = {**IMAGE_RUNS["digits-plain"], "method": "sida", "lr": "5e-5", "options": ("--fake-grad-clip", "0")}
# "digits-di": Diff-Instruct with the "digits" run's batch, learning rates and budget (its own σ law and EMA
# defaults), the family's per-kimg leader on digits early on (see the 2026-12-02 record above); its student is
# committed as diff-instruct-digits-28min (benchmarks/sds.py has the 10-minute diff-instruct-digits).
IMAGE_RUNS["digits-di"] = {**IMAGE_RUNS["digits-plain"], "method": "diff-instruct", "options": (),
                           "ship_as": "diff-instruct-digits-28min"}
# 2026-12-06, eighteenth session, a machine that slowed from 0.74 s per SiD iteration (batch 128, one core, at the
# start) to 1.2-2.1 s within the hour, so runs are compared by kimg. The detached warm start (`--detach-kimg
# K`: SiD's loss with the networks' inputs detached for the first K kimg, then the full gradient) on the "digits"
# settings, in-run FD, seed 0 ("digits" there; the teacher 0.566): 1.123 at 48 kimg (1.560 at 42), 0.951 at 66,
# then level, 0.941 at 96 (1.037 at 102); after the switch at 100 kimg it falls again: 0.823 at 120 (0.926 at
# 126), 0.764 at 150 (0.882) — where "digits" is at 0.76 only at ~270 kimg. Run as the benchmark "digits-detach100"
# (28 minutes reached only 156 kimg on this machine, 1.38 s per iteration): seeds 1/2/3 0.734 / 0.683 / 0.954,
# mean 0.790 (teacher 0.629; "digits" at 303 kimg 0.757). A --detach-kimg 150 run beside it (identical up to
# 100 kimg) was stopped to give the other core back. That run resumed from its 156-kimg state (same settings,
# 34 more minutes, alone at 1.6-2.1 s per iteration), in-run: 0.709 at 192, 0.654 at 240 (the t_max switch at 230),
# 0.587 at 270, 0.584 at 300, 0.588 at 309 ("digits" 0.738 at 303; the teacher 0.566); at 308 kimg seeds 1/2/3
# 0.649 / 0.678 / 0.704, mean 0.677 (teacher 0.633 / 0.589 / 0.665, mean 0.629; "digits" at 303 kimg 0.757; the
# plain SiD 90-minute run above 0.691 at 450 kimg, 0.674 at 510). So the warm start saves ~170 of the ~570 kimg,
# and at the ~300 kimg of 28 minutes on the fast machine the student is still above the teacher at every seed
# (benchmarks/results/sid_trial_digits-detach100_resumed_308kimg.json).
# A 60-kimg warm start (the detached curve levels at ~66 kimg; 22 minutes alone, 113 kimg): 0.929 at 66, 0.808 at
# 84, then level, 0.803 at 96-102, 0.814 at 113 (detach100: 0.966 at 84, 0.932 at 102, 0.866 at 114, 0.823 at
# 120): ahead by ~30 kimg at 90 kimg but levelling sooner; where the two stand at 300 kimg is untested.
IMAGE_RUNS["digits-detach100"] = {**IMAGE_RUNS["digits-plain"],
                                  "options": IMAGE_RUNS["digits-plain"]["options"] + ("--detach-kimg", "100")}
# 2026-12-07, nineteenth session, a slow machine again (SiD 1.6 s per iteration at batch 128 on one core). The
# warm start with Diff-Instruct's own loss (`--detach-loss diff-instruct`: log-normal σ, unit weight; the "digits-di"
# run's curve to 100 kimg, 0.763 at 96, where SiD's detached loss was at 0.94), then SiD on the "digits" settings
# (in-run FD, seed 0; the teacher 0.566): 0.718 at 114 kimg (digits-detach100 0.866, "digits" 0.963), 0.609 at 132,
# 0.597 at 144 (0.764 / 0.882 at 150). Diff-Instruct continued past 100 kimg instead (same run, --ema-halflife-kimg
# 100): 0.749 at 114, 0.722 at 132 (stopped). Its 140-kimg snapshot at noise seeds 1/2/3: 0.554 / 0.683 / 0.943,
# mean 0.726 (teacher 0.633 / 0.589 / 0.665, mean 0.629). Run as the benchmark (1.32 s per iteration, 163 kimg):
# seeds 0.581 / 0.751 / 0.834, mean 0.722. The trial went on to 60 minutes: level at 0.58-0.61 from 144 to 234 kimg,
# then after the t_max switch at 230 0.566 at 270, 0.548 at 300 (below the teacher's 0.566 at seed 0). Its
# 300-kimg snapshot at noise seeds 1-10: mean 0.664 (std 0.113), below the teacher (mean 0.581, std 0.067) at 1 of
# 10; 5000 samples against all 1497 images 0.471 (teacher 0.425; plain SiD at 570 kimg 0.487, 660 kimg 0.499):
# the best student so far at half the images, still ~11% above the teacher. Its FD moves with the noise seed
# because the sample set does, not because of a few outliers: five disjoint 1000-sample sets against the same 1497
# images 0.42-0.71 (teacher 0.45-0.66), and dropping the 5-20 samples farthest from the data (Mahalanobis) moves
# the FD by < 0.02, for the committed digits student as well.
# The benchmark run resumed from its 163-kimg state with the t_max switch moved there (to the level part of the
# curve): to 500 0.605 at 198, 0.623 at 222, 0.590 at 271; to 400 0.630 at 180, 0.585 at 271 (the switch at 230:
# 0.566 at 270). Neither is kept.
IMAGE_RUNS["digits-di-warm100"] = {**IMAGE_RUNS["digits-plain"], "options": IMAGE_RUNS["digits-plain"]["options"] + (
    "--detach-kimg", "100", "--detach-loss", "diff-instruct")}
# 2026-12-07, twentieth session, a fast machine again (SiD 0.59-0.63 s per iteration at batch 128 on one core, two
# runs at a time; the t_max switch at 230 kimg is now inside the 28 minutes). On top of the Diff-Instruct warm
# start, in-run FD, seed 0 (the teacher 0.566): the fake score in eval mode inside the generator loss, as the
# reference does ("digits-di-warm100-fake-eval"): 0.775 at 96 kimg, 0.718 at 144, 0.537 at 192, 0.489 at 240,
# 0.445 at 288, 0.417 at 318, 0.434 at 343 (the end of the 28 minutes); at noise seeds 1/2/3 0.483 / 0.551 / 0.590,
# mean 0.541 (teacher 0.633 / 0.589 / 0.665, mean 0.629): below the teacher at every seed. Neither network with
# dropout ("digits-di-warm100-no-dropout", --dropout 0, beside it): 0.816 at 96, 0.660 at 144, then level or up
# (0.698 at 216, 0.614 at 336, 0.637 at 367); seeds 0.748 / 0.697 / 0.644, mean 0.696. On plain SiD --fake-eval
# had gained little ("digits-fake-eval": mean 0.776 against 0.757); after the Diff-Instruct warm start it is what
# takes the one-step student below its teacher, so these are the "digits" settings now (below).
IMAGE_RUNS["digits-di-warm100-fake-eval"] = {**IMAGE_RUNS["digits-di-warm100"],
                                            "options": IMAGE_RUNS["digits-di-warm100"]["options"] + ("--fake-eval",)}
IMAGE_RUNS["digits-di-warm100-no-dropout"] = {**IMAGE_RUNS["digits-di-warm100"],
                                             "options": IMAGE_RUNS["digits-di-warm100"]["options"] + ("--dropout", "0")}
# "digits": the settings the digits benchmark runs (and `side_by_side_sid` beside the other methods' benchmarks):
# the Diff-Instruct warm start, then SiD with the fake score in eval mode (see the 2026-12-07 record above).
# "digits-seed1" etc.: the same with other training seeds (the seed alone moved "digits-plain"'s seed mean by 0.1).
# 2026-12-07, twentieth session (0.63-0.65 s per iteration, two runs at a time): "digits" re-run retraced the
# ablation's in-run curve value for value and stopped at 333 kimg (0.425 there): seeds 1/2/3 0.469 / 0.559 /
# 0.603. Training seeds 1 / 2 / 3 (335-340 kimg): 0.647 / 0.811 / 0.920, 0.560 / 0.520 / 0.494, 0.511 / 0.577 /
# 0.745 (teacher 0.633 / 0.589 / 0.665). `--only wide` (noise seeds 1-10 at n = 1000; 5000 samples against all
# 1497 images), teacher mean 0.581 (std 0.067), 5000 samples 0.379: training seed 0 mean 0.570 (below the
# teacher at 6 of 10), 0.403; seed 1 0.749 (0 of 10), 0.416; seed 2 0.542 (7 of 10), 0.376; seed 3 0.577 (6 of
# 10), 0.396. So 3 of 4 training seeds match the teacher on the ten-seed mean and the large-sample FD is 4-10%
# above the teacher's for three and below it for one; seed 1's in-run curve (seed 0) sat at the teacher's 0.56
# from 220 kimg on.
IMAGE_RUNS["digits"] = {**IMAGE_RUNS["digits-di-warm100-fake-eval"]}
for _seed in (1, 2, 3):
    IMAGE_RUNS[f"digits-seed{_seed}"] = {**IMAGE_RUNS["digits"],
                                         "options": IMAGE_RUNS["digits"]["options"] + ("--seed", str(_seed))}
EXTRA_SEEDS = (2, 3)  # FD at n = 1000 moves by ~0.1 between noise seeds: student and teacher at these seeds too


def side_by_side_sid(run_name: str, minutes: float) -> dict:
    """SiD with the "digits" benchmark's settings in RUNS/run_name, for another method's benchmark to run beside
    it (one core each, the same minutes): its run folder is scored there, its student not committed."""
    cfg = IMAGE_RUNS["digits"]
    run = RUNS / run_name
    shutil.rmtree(run, ignore_errors=True)
    info = _distill("sid", str(SHIPPED / "digits"), run, minutes, "--batch-size", str(cfg["batch"]), "--lr-g",
                    cfg["lr"], "--lr-fake", cfg["lr"], *cfg["options"], eval_n=cfg["n"], eval_every=cfg["eval_every"])
    return {"distill": info, "run": str(run.relative_to(ROOT)), "settings": "benchmarks/sid.py IMAGE_RUNS['digits']"}


def bench_images(name: str, minutes: float) -> dict:
    cfg = IMAGE_RUNS[name]
    data, n, lr = cfg["data"], cfg["n"], cfg["lr"]
    run = RUNS / f"sid-{name}"
    shutil.rmtree(run, ignore_errors=True)
    method = cfg.get("method", "sid")
    ship = cfg.get("ship_as") or (f"sid-{name}" if name == data else f"{method}-{data}" if method != "sid" else None)
    info = _distill(method, str(SHIPPED / data), run, minutes, "--batch-size", str(cfg["batch"]), "--lr-g", lr,
                    "--lr-fake", lr, *cfg["options"], eval_n=n, eval_every=cfg["eval_every"])
    teacher = _eval(SHIPPED / data, n, sampler="heun", steps=18)
    student = _eval(run, n)
    fd_key = next(k for k in teacher if k.startswith("fd_") and "floor" not in k)
    seeds = fd_by_seed(data, run, n, fd_key, teacher[fd_key], student[fd_key])
    curve, plot, teacher_seed0 = plot_curve(name, data, run, n, fd_key, method)
    res = {"data": data, "method": method, "distill": info, "n_samples": n, "teacher_heun35": _pick(teacher),
           "student_sid_1nfe": _pick(student), "fd_key": fd_key,
           "student_fd_at_or_below_teacher": student[fd_key] <= teacher[fd_key],
           "fd_by_seed": seeds, "student_at_or_below_teacher_seeds": seeds_at_or_below(seeds),
           "throughput_ratio_student_over_teacher": student["samples_per_second"] / teacher["samples_per_second"],
           "curve": [{"kimg": r["kimg"], "train_seconds": r["train_seconds"], fd_key: r[fd_key]} for r in curve],
           "curve_seed": 0, "teacher_heun35_at_curve_seed": _pick(teacher_seed0),
           "curve_plot": str(plot.relative_to(ROOT)),
           "student_checkpoint": _ship_student(run, ship) if ship else None}
    print(json.dumps({k: v for k, v in res.items() if k != "curve"}, indent=1), flush=True)
    return res


def fd_by_seed(data: str, student, n: int, fd_key: str, teacher_seed1: float, student_seed1: float) -> dict:
    """FD of the teacher (35-NFE Heun) and of the one-step student at noise seed 1 (given) and at EXTRA_SEEDS."""
    seeds = {str(seed): {"teacher_heun35": _eval(SHIPPED / data, n, seed=seed, sampler="heun", steps=18)[fd_key],
                         "student_sid_1nfe": _eval(student, n, seed=seed)[fd_key]} for seed in EXTRA_SEEDS}
    seeds["1"] = {"teacher_heun35": teacher_seed1, "student_sid_1nfe": student_seed1}
    return dict(sorted(seeds.items()))


def seeds_at_or_below(seeds: dict) -> int:
    return sum(v["student_sid_1nfe"] <= v["teacher_heun35"] for v in seeds.values())


def _image_result(results: dict, name: str) -> dict:
    """The committed result of image run `name` in sid.json, or a clear error naming the command that makes it."""
    if name not in IMAGE_RUNS:
        raise SystemExit(f"{name}: not an image run of benchmarks/sid.py (one of: {', '.join(IMAGE_RUNS)})")
    if not isinstance(results.get(name), dict) or "fd_key" not in results[name]:
        raise SystemExit(f"{name}: no image-run result in benchmarks/results/sid.json; run "
                         f"`FEWSTEP_THREADS=1 python benchmarks/sid.py --only {name}` first")
    return results[name]


def reevaluate_seeds(results: dict, name: str) -> dict:
    """An image run committed before the extra noise seeds were measured: its committed student and the
    teacher at EXTRA_SEEDS (seed 1 re-measured too, and checked against the committed numbers)."""
    r = _image_result(results, name)
    if not r.get("student_checkpoint"):
        raise SystemExit(f"{name}: no committed student to re-evaluate")
    data, n, key = r.get("data", IMAGE_RUNS[name]["data"]), r["n_samples"], r["fd_key"]
    teacher = _eval(SHIPPED / data, n, sampler="heun", steps=18)[key]
    student = _eval(ROOT / r["student_checkpoint"], n)[key]
    committed = r["teacher_heun35"][key], r["student_sid_1nfe"][key]
    if not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip((teacher, student), committed)):
        raise SystemExit(f"{name}: seed 1 does not reproduce (teacher, student now {teacher:.4g}, {student:.4g}; "
                         f"committed {committed[0]:.4g}, {committed[1]:.4g}): the other seeds would not compare")
    seeds = fd_by_seed(data, ROOT / r["student_checkpoint"], n, key, teacher, student)
    print(json.dumps({"seed 1 now": [teacher, student], "seed 1 committed": committed, "by seed": seeds},
                     indent=1), flush=True)
    return {**r, "fd_by_seed": seeds, "student_at_or_below_teacher_seeds": seeds_at_or_below(seeds),
            "fd_by_seed_provenance": f"noise seeds measured on {time.strftime('%Y-%m-%d')} from the committed "
                                     f"student by `python benchmarks/sid.py --only seeds --runs {name}`"}


WIDE_SEEDS = tuple(range(1, 11))  # the "wide" part: ten noise seeds at n = 1000 ...
WIDE_N = 5000  # ... and one FD of 5000 samples (noise seed 0) against all of the data's training images


def wide_eval(results: dict, names) -> dict:
    """The teacher (35-NFE Heun) and the one-step students of the image runs `names` (the committed student, else
    the run folder in RUNS) at noise seeds 1-10 (n = 1000: the mean and spread over seeds that three seeds only
    sketch) and with 5000 samples against every training image, where the FD's sampling noise is smallest."""
    import statistics

    out, teachers = {}, {}
    for name in names:
        r = _image_result(results, name)
        data, n, key = r.get("data", IMAGE_RUNS[name]["data"]), r["n_samples"], r["fd_key"]
        path = ROOT / r["student_checkpoint"] if r.get("student_checkpoint") else RUNS / f"sid-{name}"
        if not path.exists():
            raise SystemExit(f"{name}: neither a committed student nor the run folder {path} to evaluate")
        if (data, n) not in teachers:
            teachers[data, n] = {"seeds": {s: _eval(SHIPPED / data, n, seed=s, sampler="heun", steps=18)[key]
                                           for s in WIDE_SEEDS},
                                 "n_large": _pick(_eval(SHIPPED / data, WIDE_N, seed=0, sampler="heun", steps=18))}
        t = teachers[data, n]
        student = {s: _eval(path, n, seed=s)[key] for s in WIDE_SEEDS}
        large_raw = _eval(path, WIDE_N, seed=0)
        large = _pick(large_raw)
        out[name] = {
            "student": str(path.relative_to(ROOT)), "n_samples": n, "fd_key": key,
            "fd_by_seed": {str(s): {"teacher_heun35": t["seeds"][s], "student_sid_1nfe": student[s]} for s in WIDE_SEEDS},
            "teacher_mean": statistics.mean(t["seeds"].values()), "teacher_std": statistics.stdev(t["seeds"].values()),
            "student_mean": statistics.mean(student.values()), "student_std": statistics.stdev(student.values()),
            "at_or_below_teacher_seeds": sum(student[s] <= t["seeds"][s] for s in WIDE_SEEDS),
            "n_large": WIDE_N, "n_reference_large": large_raw.get("n_reference"),
            "teacher_heun35_large": t["n_large"], "student_sid_1nfe_large": large,
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/sid.py --only wide --runs " + " ".join(names)}
        print(name, json.dumps({k: v for k, v in out[name].items() if "large" not in k}, indent=1), flush=True)
    return out


def plot_curve(name: str, data: str, run: Path, n: int, fd_key: str, method: str = "sid"):
    """FD vs images seen of the in-run evaluations (noise seed 0), with the teacher and the
    real-data floor measured under the same protocol and seed."""
    from fewstep.eval.plots import plot_curves

    curve = read_curve(run)
    teacher = _eval(SHIPPED / data, n, seed=0, sampler="heun", steps=18)
    xs = [r["kimg"] for r in curve]
    plot = RESULTS / f"sid_{name}_fd_curve.png"
    label = {"sid": "SiD", "sida": "SiDA"}.get(method, method)
    plot_curves({f"{label} student (1 NFE, EMA)": (xs, [r[fd_key] for r in curve]),
                 "teacher Heun (35 NFE)": (xs, [teacher[fd_key]] * len(xs)),
                 "real-data floor": (xs, [teacher[fd_key.replace("fd_", "fd_floor_")]] * len(xs))},
                plot, xlabel="images seen (kimg)", ylabel=f"FD ({fd_key[3:]}, n={n}, seed 0)", logy=True,
                title=f"{label} on {data}: FD vs images seen" + ("" if name == data else f" ({name})"))
    return curve, plot, teacher


# ---- SiD vs Diff-Instruct vs DMD at equal wall-clock -----------------------------------------------
COMPARE_METHODS = ("sid", "diff-instruct", "dmd")  # the data-free fake-score family; SiDA has its digits run
def bench_compare(data: str, minutes: float, batch: int, lr: str) -> dict:
    rows = {}
    n = 1000 if data == "mnist5k" else 300
    teacher = _eval(SHIPPED / data, n, sampler="heun", steps=18)
    fd_key = next(k for k in teacher if k.startswith("fd_") and "floor" not in k)
    for method in COMPARE_METHODS:
        run = RUNS / f"compare-{data}-{method}"
        shutil.rmtree(run, ignore_errors=True)
        info = _distill(method, str(SHIPPED / data), run, minutes, "--batch-size", str(batch), "--lr-g", lr,
                        "--lr-fake", lr, eval_n=n, eval_every=max(1.0, minutes * 2.0))
        r = _eval(run, n)
        rows[method] = {"distill": info, "student_1nfe": _pick(r)}
        print(method, info["kimg"], r[fd_key], flush=True)
    table = ["| method | NFE | kimg | iterations | train s | " + fd_key + " |", "|---|---|---|---|---|---|"]
    table.append(f"| teacher (Heun) | 35 | – | – | – | {teacher[fd_key]:.3f} |")
    for m, r in rows.items():
        d = r["distill"]
        table.append(f"| {m} | 1 | {d['kimg']:.1f} | {d['iterations']} | {d['train_seconds']:.0f} | "
                     f"{r['student_1nfe'][fd_key]:.3f} |")
    return {"data": data, "minutes_each": minutes, "n_samples": n, "fd_key": fd_key,
            "teacher_heun35": _pick(teacher), "methods": rows, "table": "\n".join(table)}


# ---- cost of one SiD iteration vs one teacher-training step --------------------------------------
def bench_cost(data: str, batch: int, iters: int = 20, repeats: int = 5) -> dict:
    """Seconds per teacher-training step and per SiD iteration at one batch, in fp32 and under
    ``--precision bf16`` (the loop's autocast), interleaved: the ratios are side by side."""
    import torch

    from fewstep.data import load_dataset
    from fewstep.methods.sid import SiD, SiDConfig
    from fewstep.model import load_model
    from fewstep.teachers.training import EDMTeacher, TeacherConfig
    from fewstep.training.loop import autocast

    torch.set_num_threads(threads())
    teacher = load_model(SHIPPED / data)
    sid = SiD.create(SiDConfig(), teacher=teacher)
    sid.batch_size = batch
    sid.optimizers = sid.build_optimizers()
    edm = EDMTeacher(TeacherConfig(net=teacher.config["net"]), teacher.data_info)
    edm.optimizers = edm.build_optimizers()
    ds = load_dataset(data, split="train")
    x = ds.x[:batch]
    cpu = torch.device("cpu")

    def step_teacher(precision):
        opt = edm.optimizers["denoiser"]
        opt.zero_grad(set_to_none=True)
        with autocast(cpu, precision):
            loss = edm.loss((x, None))[0]
        loss.backward()
        opt.step()

    def step_sid(precision):
        for ph in sid.phases():
            opt = sid.optimizers[ph.optimizer]
            opt.zero_grad(set_to_none=True)
            with autocast(cpu, precision):
                loss = ph.loss(None)[0]
            loss.backward()
            opt.step()

    def timeit(fn, precision):
        for _ in range(3):
            fn(precision)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(precision)
        return (time.perf_counter() - t0) / iters

    times = {(what, p): [] for what in ("teacher", "sid") for p in ("fp32", "bf16")}
    for _ in range(repeats):  # interleaved repeats, median (this machine's speed drifts by ~20% over minutes)
        for (what, p), v in times.items():
            v.append(timeit(step_teacher if what == "teacher" else step_sid, p))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"data": data, "batch": batch, "threads": threads(), "iterations_timed": iters * repeats,
            "teacher_step_seconds": med["teacher", "fp32"], "sid_iteration_seconds": med["sid", "fp32"],
            "ratio": med["sid", "fp32"] / med["teacher", "fp32"],
            "teacher_step_seconds_bf16": med["teacher", "bf16"], "sid_iteration_seconds_bf16": med["sid", "bf16"],
            "bf16_speedup_teacher": med["teacher", "fp32"] / med["teacher", "bf16"],
            "bf16_speedup_sid": med["sid", "fp32"] / med["sid", "bf16"],
            "cpu_bf16_instructions": cpu_bf16_flags(),
            "note": "SiD iteration = fake-score update (G forward + fake forward/backward) + generator update "
                    "(G, teacher and fake forward, backward through all three); floor ≈ 3 teacher steps. "
                    "bf16 = --precision bf16 (torch.autocast; weights, optimiser and loss arithmetic fp32)"}


def cpu_bf16_flags() -> list[str]:
    """The CPU's bfloat16 instruction sets (bf16 autocast is only faster with them)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags.split(":", 1)[1].split() if "bf16" in f or f.startswith("amx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["mixture", "cost", "compare", "mnist5k"],
                    choices=["mixture", *IMAGE_RUNS, "compare", "cost", "seeds", "wide"])
    ap.add_argument("--runs", nargs="*", default=["mnist5k"],
                    help="seeds part: committed image runs whose student and teacher to re-evaluate at noise "
                         "seeds 1, 2, 3 (runs from before those seeds were measured); wide part: image runs to "
                         "evaluate at noise seeds 1-10 and with 5000 samples (their committed student, else "
                         "their run folder)")
    ap.add_argument("--minutes", type=float, default=None, help="override each run's wall-clock budget")
    ap.add_argument("--presets", nargs="*", default=list(MIXTURE_RUNS), choices=list(MIXTURE_RUNS),
                    help="mixture part: which runs (separate processes may run one each; results merge)")
    ap.add_argument("--compare-data", default="digits")
    ap.add_argument("--replot", default=None, help="only redraw the FD curve of this finished image run")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(threads())
    path = RESULTS / "sid.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.replot:
        r = results[args.replot]
        _, _, t0 = plot_curve(args.replot, r.get("data", args.replot), RUNS / f"sid-{args.replot}", r["n_samples"],
                              r["fd_key"], r.get("method", "sid"))
        r["curve_seed"], r["teacher_heun35_at_curve_seed"] = 0, _pick(t0)
        write_json("sid.json", results)
        return
    for part in args.only:
        t0 = time.time()
        if part == "mixture":
            results["mixture"] = bench_mixture(args.minutes or 12.0, args.presets)
        elif part in IMAGE_RUNS:
            results[part] = bench_images(part, args.minutes or IMAGE_RUNS[part]["minutes"])
        elif part == "compare":
            results["compare"] = bench_compare(args.compare_data, args.minutes or 5.0, batch=32, lr="5e-5")
        elif part == "wide":
            wide = wide_eval(results, args.runs)
            results = json.loads(path.read_text()) if path.is_file() else {}
            for name, w in wide.items():
                results[name]["wide"] = w
            write_json("sid.json", results)
            print(f"wide: {time.time() - t0:.0f}s", flush=True)
            continue
        elif part == "seeds":
            seeded = {name: reevaluate_seeds(results, name) for name in args.runs}
            results = json.loads(path.read_text()) if path.is_file() else {}
            results.update(seeded)
            write_json("sid.json", results)
            print(f"seeds: {time.time() - t0:.0f}s", flush=True)
            continue
        elif part == "cost":
            cost = {d: bench_cost(d, 32) for d in ("digits", "mnist5k") if (SHIPPED / d).is_dir()}
            if (SHIPPED / "digits").is_dir():  # also at the digits benchmark's own batch
                cost["digits-batch128"] = bench_cost("digits", 128, iters=10)
            results["cost"] = cost
        part_result = results[part]
        results = json.loads(path.read_text()) if path.is_file() else {}  # merge: other parts may have run meanwhile
        cmd = (f"FEWSTEP_THREADS={threads()} " if threads() != 2 else "") + f"python benchmarks/sid.py --only {part}" \
            + (f" --minutes {args.minutes}" if args.minutes else "")
        if part == "mixture":  # merge per preset: `--presets ring8` and `--presets grid25` may run side by side
            if args.presets != list(MIXTURE_RUNS):
                cmd += " --presets " + " ".join(args.presets)
            for r in results.get("mixture", {}).values():  # earlier runs keep the command that made them
                r.setdefault("benchmark_command", results.get("commands", {}).get("mixture"))
            for r in part_result.values():
                r.setdefault("benchmark_command", cmd)
            part_result = {**results.get("mixture", {}), **part_result}
        results[part] = part_result
        results.setdefault("commands", {})[part] = cmd
        results["environment"] = environment()
        write_json("sid.json", results)
        print(f"{part}: {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
