"""Bring your own diffusers teacher, end to end, as a user would.

    FEWSTEP_THREADS=1 python benchmarks/diffusers_teacher.py   # ≈ 40 min on one core

1. Train a diffusers ``UNet2DModel`` on digits with diffusers' own DDPM recipe (ε-prediction on the
   linear-β ``DDPMScheduler`` of 1000 steps, ``scheduler.add_noise``, MSE on ε, AdamW, diffusers'
   ``EMAModel``), and save it with ``DDPMPipeline.save_pretrained``: the folder a user brings.
2. Evaluate that folder as a teacher: ``fewstep eval FOLDER --data digits`` (Heun, 35 NFE, on the
   Karras grid over its ᾱ table's σ range; and DDIM with 50 steps at its own timesteps, trailing
   spacing, which is diffusers' ``DDIMScheduler(timestep_spacing="trailing")``).
3. ``fewstep distill sid --teacher FOLDER --data digits ...``: the one-step student is the same
   diffusers UNet with new weights, saved as a fewstep checkpoint.
4. Student vs teacher: FD at n = 1000 for noise seeds 1, 2, 3, NFE, samples per second, and the
   FD-vs-images-seen curve. Writes ``benchmarks/results/diffusers_teacher.json`` (+ plot), and ships
   the teacher folder (``benchmarks/results/diffusers-digits-teacher``) and the student
   (``benchmarks/results/students/sid-diffusers-digits``) for anyone to re-evaluate.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, environment, fewstep, read_curve, threads, write_json  # noqa: E402

TEACHER = RUNS / "diffusers-digits-teacher"
STUDENT = RUNS / "sid-diffusers-digits"
SEEDS = (1, 2, 3)
# the UNet a user might write for 8×8 images: two resolutions, attention at 4×4, dropout 0.1
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=32, dropout=0.1)
# SiD settings: the digits benchmark's (benchmarks/sid.py IMAGE_RUNS["digits"]) without its t_max switch at
# 230 kimg, which a run of this length does not reach
SID_OPTIONS = ("--batch-size", "128", "--lr-g", "1e-4", "--lr-fake", "1e-4", "--t-max", "650",
               "--ema-halflife-kimg", "100")


def train_teacher(minutes: float, batch: int = 64, lr: float = 1e-3, seed: int = 0) -> dict:
    """diffusers' DDPM training recipe on the digits images, for ``minutes`` of wall-clock."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from fewstep.data import load_dataset

    torch.set_num_threads(threads())
    torch.manual_seed(seed)
    x = load_dataset("digits", split="train").x  # [-1, 1], as diffusers' image pipelines expect
    unet = UNet2DModel(**UNET)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=0.75)
    warmup = 200
    gen = torch.Generator().manual_seed(seed)
    t0, it = time.perf_counter(), 0
    unet.train()
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        x0 = x[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (it + 1) / warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        it += 1
        if it % 500 == 0:
            print(f"teacher it {it} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(TEACHER)
    return {"iterations": it, "kimg": it * batch / 1000, "train_seconds": round(seconds, 1), "batch": batch,
            "lr": lr, "ema_decay": 0.999, "params": sum(p.numel() for p in unet.parameters()),
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
            "scheduler": "DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', prediction_type='epsilon')",
            "folder": str(TEACHER.relative_to(ROOT))}


def _ship(src: Path, dest: Path) -> str:
    import shutil

    if src.resolve() != dest.resolve():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
    return str(dest.relative_to(ROOT))


def _eval(model, seed: int, **kw) -> dict:
    from fewstep.eval.runner import evaluate_model

    r = evaluate_model(model, n=1000, seed=seed, data="digits", **kw)
    keep = ("nfe", "n_samples", "sample_seconds", "samples_per_second", "n_floor")
    return {k: v for k, v in r.items() if k in keep or k.startswith(("fd_", "precision_", "recall_"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-minutes", type=float, default=10.0, help="diffusers training of the teacher")
    ap.add_argument("--minutes", type=float, default=20.0, help="SiD distillation")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the existing teacher and student")
    args = ap.parse_args()

    from fewstep.eval.plots import plot_curves
    from fewstep.model import load_model

    prev = json.loads((RESULTS / "diffusers_teacher.json").read_text()) if args.eval_only else {}
    teacher_info = prev.get("teacher_training") if args.eval_only else train_teacher(args.teacher_minutes)
    print(json.dumps(teacher_info), flush=True)

    if args.eval_only:
        distill = prev["distill"]
    else:
        import shutil

        shutil.rmtree(STUDENT, ignore_errors=True)
        cmd = ["distill", "sid", "--teacher", str(TEACHER), "--data", "digits", "--out", str(STUDENT),
               "--total-kimg", "100000", "--max-minutes", str(args.minutes), "--no-progress", *SID_OPTIONS,
               "--eval-n", "1000", "--eval-every-kimg", "12"]
        wall = fewstep(*cmd)
        summary = json.loads((STUDENT / "summary.json").read_text())
        distill = {"command": "fewstep " + " ".join(cmd).replace(str(ROOT) + "/", ""), "wall_seconds": round(wall, 1),
                   **{k: summary[k] for k in ("kimg", "iterations", "train_seconds", "eval_seconds", "sec_per_iter",
                                              "nonfinite_losses")}}

    # the diffusers folder and the student; --eval-only on a fresh checkout: the shipped copies
    teacher_dir = TEACHER if TEACHER.is_dir() else RESULTS / "diffusers-digits-teacher"
    student_dir = STUDENT / "model" if STUDENT.is_dir() else RESULTS / "students" / "sid-diffusers-digits"
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    res = {"teacher_heun35": {}, "student_sid_1nfe": {}}
    for s in SEEDS:
        res["teacher_heun35"][str(s)] = _eval(teacher, s)
        res["student_sid_1nfe"][str(s)] = _eval(student, s)
        print(s, res["teacher_heun35"][str(s)]["fd_digits-featnet"], res["student_sid_1nfe"][str(s)]["fd_digits-featnet"],
              flush=True)
    ddim = _eval(teacher, 1, sampler="ddim", steps=50, schedule="vp-uniform")  # = diffusers' DDIMScheduler
    fd = "fd_digits-featnet"
    mean = {k: sum(res[k][str(s)][fd] for s in SEEDS) / len(SEEDS) for k in res}
    curve = read_curve(STUDENT) if (STUDENT / "metrics.jsonl").is_file() else prev["curve"]
    teacher_seed0 = _eval(teacher, 0)[fd]
    xs = [r["kimg"] for r in curve]
    plot = RESULTS / "sid_diffusers_digits_fd_curve.png"
    plot_curves({"SiD student (1 NFE, EMA)": (xs, [r[fd] for r in curve]),
                 "diffusers teacher, Heun (35 NFE)": (xs, [teacher_seed0] * len(xs))},
                plot, xlabel="images seen (kimg)", ylabel="FD (digits-featnet, n=1000, seed 0)",
                title="SiD on a diffusers UNet2DModel teacher (digits)")
    out = {
        "environment": environment(), "command": "FEWSTEP_THREADS=1 python benchmarks/diffusers_teacher.py"
        + (f" --teacher-minutes {args.teacher_minutes}" if args.teacher_minutes != 10.0 else "")
        + (f" --minutes {args.minutes}" if args.minutes != 20.0 else ""),
        "teacher_training": teacher_info, "distill": distill, "sid_options": list(SID_OPTIONS),
        **res, "teacher_ddim50_seed1": ddim, "fd_mean": mean, "seeds": list(SEEDS), "n_samples": 1000,
        "student_at_or_below_teacher": sum(res["student_sid_1nfe"][str(s)][fd] <= res["teacher_heun35"][str(s)][fd]
                                           for s in SEEDS),
        "speedup_samples_per_second": (res["student_sid_1nfe"]["1"]["samples_per_second"]
                                       / res["teacher_heun35"]["1"]["samples_per_second"]),
        "curve": [{"kimg": r["kimg"], "train_seconds": r.get("train_seconds"), fd: r[fd]} for r in curve],
        "curve_teacher_seed0": teacher_seed0, "curve_plot": str(plot.relative_to(ROOT)),
    }
    if args.eval_only:  # the numbers come from the run that trained them; this command re-measured them
        out["command"], out["evaluated_by"] = prev["command"], "FEWSTEP_THREADS=1 python benchmarks/diffusers_teacher.py --eval-only"
    # ship both, so that anyone can re-evaluate them: `fewstep eval FOLDER --data digits`
    out["teacher_folder"] = _ship(teacher_dir, RESULTS / "diffusers-digits-teacher")
    out["student_checkpoint"] = _ship(student_dir, RESULTS / "students" / "sid-diffusers-digits")
    assert all(math.isfinite(v) for v in mean.values())
    write_json("diffusers_teacher.json", out)
    print(json.dumps({k: out[k] for k in ("fd_mean", "student_at_or_below_teacher", "speedup_samples_per_second")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
