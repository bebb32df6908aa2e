"""Guidance distillation (Meng et al. 2023) on a class-conditional digits teacher.

    python benchmarks/guidance.py --only teacher    # the class-conditional digits teacher (8 min, 2 cores)
    python benchmarks/guidance.py --only distill    # guidance distillation from it (15 min, 2 cores)
    python benchmarks/guidance.py --only compare    # teacher CFG (2 evaluations per step) vs the student (1), κ 1-4
    python benchmarks/guidance.py --only steps      # stage two: progressive distillation of the student, 16 → 2 steps
    python benchmarks/guidance.py --only steps-compare   # its 4- and 2-step students against the teacher's CFG

The teacher is trained like the shipped digits teacher, with --conditional (label dropout 0.1, so it has the
unlabelled prediction that classifier-free guidance needs). The student is the teacher's network with a
guidance input, trained for every κ in [1, 5]. Both sample with Heun, 18 steps: the teacher's CFG costs 70
network evaluations per sample (35 at κ = 1), the student's 35 at every κ. Scored at each κ by FD and label
accuracy (the digits feature classifier's class = the conditioning label) at n = 1000 for noise seeds 1/2/3,
and by the RMS distance between the student's and the teacher's samples from the same noise and labels.
Results: benchmarks/results/guidance.json; teacher and student: benchmarks/results/students/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, fewstep, run_parts  # noqa: E402

STUDENTS = RESULTS / "students"
TEACHER = STUDENTS / "teacher-digits-cond"
STUDENT = STUDENTS / "guidance-digits"
STEPS_RUN = RUNS / "guidance-digits-pd"
STEPS_STUDENT = STUDENTS / "guidance-digits-pd"
STEPS_OPTIONS = ["--start-steps", "16", "--end-steps", "2", "--total-kimg", "120", "--batch-size", "64"]
TEACHER_OPTIONS = ["--conditional", "--total-kimg", "2000", "--batch-size", "64", "--lr", "1e-3",
                   "--ema-halflife-kimg", "10"]  # the shipped digits teacher's (benchmarks/teachers.py), labelled
DISTILL_OPTIONS = ["--batch-size", "64", "--lr", "2e-4"]
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
SEEDS = (1, 2, 3)
N = 1000


def _ship(run: Path, dest: Path, command: str) -> str:
    """Copy a run's model (or a model folder, such as a stage's) to ``dest``, its command in its provenance."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "model" if (run / "model").is_dir() else run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["provenance"] = {**cfg.get("provenance", {}), "command": command}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return str(dest.relative_to(ROOT))


def _summary(run: Path, args: list[str], wall: float) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {"command": "fewstep " + " ".join(args).replace(str(ROOT) + "/", ""), "wall_seconds": round(wall, 1),
            **{k: s[k] for k in ("kimg", "iterations", "train_seconds", "sec_per_iter")}}


def part_teacher(minutes: float | None) -> dict:
    run = RUNS / "teacher-digits-cond"
    shutil.rmtree(run, ignore_errors=True)
    args = ["teacher", "--data", "digits", "--out", str(run), *TEACHER_OPTIONS,
            "--max-minutes", f"{minutes or 8:g}", "--no-progress"]
    wall = fewstep(*args)
    return {**_summary(run, args, wall),
            "checkpoint": _ship(run, TEACHER, "python benchmarks/guidance.py --only teacher")}


def part_distill(minutes: float | None) -> dict:
    run = RUNS / "guidance-digits"
    shutil.rmtree(run, ignore_errors=True)
    args = ["distill", "guidance", "--teacher", str(TEACHER), "--out", str(run), "--total-kimg", "100000",
            *DISTILL_OPTIONS, "--max-minutes", f"{minutes or 15:g}", "--no-progress"]
    wall = fewstep(*args)
    return {**_summary(run, args, wall),
            "checkpoint": _ship(run, STUDENT, "python benchmarks/guidance.py --only distill")}


def _scores(model, kappa: float, **sampling) -> dict:
    from fewstep.eval.runner import evaluate_model

    by_seed = {}
    for seed in SEEDS:
        r = evaluate_model(model, n=N, seed=seed, guidance=kappa, **sampling)
        by_seed[str(seed)] = {k: v for k, v in r.items()
                              if k.startswith(("fd_", "label_accuracy_", "nfe", "samples_per_second"))
                              and "floor" not in k}
    first = by_seed[str(SEEDS[0])]
    fd = next(k for k in first if k.startswith("fd_"))
    acc = next(k for k in first if k.startswith("label_accuracy_"))
    return {"nfe": first["nfe"], "fd_mean": sum(by_seed[str(s)][fd] for s in SEEDS) / len(SEEDS),
            "label_accuracy_mean": sum(by_seed[str(s)][acc] for s in SEEDS) / len(SEEDS),
            "samples_per_second_seed1": first["samples_per_second"], "fd_key": fd, "by_seed": by_seed}


def part_compare(minutes: float | None) -> dict:
    import torch

    from fewstep.model import load_model

    teacher, student = load_model(TEACHER), load_model(STUDENT)
    rows = {}
    for kappa in SCALES:
        t, s = _scores(teacher, kappa), _scores(student, kappa)
        a = teacher.sample(N, seed=1, guidance=kappa).x
        b = student.sample(N, seed=1, guidance=kappa).x
        rms = float((a - b).pow(2).mean().sqrt())
        rows[f"{kappa:g}"] = {"teacher_cfg": t, "student": s, "rms_student_vs_teacher_seed1": rms,
                              "speedup": s["samples_per_second_seed1"] / t["samples_per_second_seed1"]}
        print(f"κ={kappa:g}: teacher NFE {t['nfe']} FD {t['fd_mean']:.3f} acc {t['label_accuracy_mean']:.3f} | "
              f"student NFE {s['nfe']} FD {s['fd_mean']:.3f} acc {s['label_accuracy_mean']:.3f} | "
              f"RMS {rms:.4f} | {rows[f'{kappa:g}']['speedup']:.2f}x", flush=True)
    head = ("| κ | teacher CFG: NFE | FD | label acc. | student: NFE | FD | label acc. | RMS student − teacher | "
            "speed-up |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {k} | {r['teacher_cfg']['nfe']} | {r['teacher_cfg']['fd_mean']:.3f} | "
             f"{r['teacher_cfg']['label_accuracy_mean']:.3f} | {r['student']['nfe']} | {r['student']['fd_mean']:.3f} | "
             f"{r['student']['label_accuracy_mean']:.3f} | {r['rms_student_vs_teacher_seed1']:.4f} | "
             f"{r['speedup']:.2f}x |" for k, r in rows.items()]
    return {"sampler": "heun, 18 steps", "n_samples": N, "seeds": list(SEEDS), "rows": rows,
            "teacher": str(TEACHER.relative_to(ROOT)), "student": str(STUDENT.relative_to(ROOT)),
            "torch_threads": torch.get_num_threads(), "table": "\n".join([head, *lines])}


def part_steps(minutes: float | None) -> dict:
    shutil.rmtree(STEPS_RUN, ignore_errors=True)
    args = ["distill", "progressive", "--teacher", str(STUDENT), "--out", str(STEPS_RUN), *STEPS_OPTIONS,
            "--no-progress"]
    wall = fewstep(*args)
    cmd = "python benchmarks/guidance.py --only steps"
    shipped = {}
    for steps in (4, 2):
        dest = STEPS_STUDENT.with_name(f"{STEPS_STUDENT.name}-{steps}")
        shipped[str(steps)] = _ship(STEPS_RUN / "stages" / f"steps-{steps}", dest, cmd)
    return {**_summary(STEPS_RUN, args, wall), "checkpoints": shipped}


def part_steps_compare(minutes: float | None) -> dict:
    from fewstep.methods.step_distill import sampling_recipe
    from fewstep.model import copy_model, load_model

    def on_grid(model, steps):  # DDIM on the progressive students' own clipped cosine grid
        m = copy_model(model)
        m.config = {**m.config, "sampling": sampling_recipe(steps)}
        return m

    teacher, student = load_model(TEACHER), load_model(STUDENT)
    rows = {}
    for kappa in (2.0, 3.0):
        rows[f"teacher CFG, Heun 18 steps (κ={kappa:g})"] = _scores(teacher, kappa)
        for steps in (4, 2):
            rows[f"teacher CFG, DDIM {steps} steps (κ={kappa:g})"] = _scores(on_grid(teacher, steps), kappa)
            rows[f"guidance student, DDIM {steps} steps (κ={kappa:g})"] = _scores(on_grid(student, steps), kappa)
            rows[f"progressive student, {steps} steps (κ={kappa:g})"] = _scores(
                load_model(ROOT / f"{STEPS_STUDENT}-{steps}"), kappa)
    for label, r in rows.items():
        print(f"{label}: NFE {r['nfe']} FD {r['fd_mean']:.3f} acc {r['label_accuracy_mean']:.3f}", flush=True)
    head = "| model (sampler, κ) | NFE | FD | label acc. |\n|---|---|---|---|"
    lines = [f"| {k} | {r['nfe']} | {r['fd_mean']:.3f} | {r['label_accuracy_mean']:.3f} |" for k, r in rows.items()]
    return {"n_samples": N, "seeds": list(SEEDS), "rows": rows, "table": "\n".join([head, *lines])}


PARTS = {"teacher": part_teacher, "distill": part_distill, "compare": part_compare, "steps": part_steps,
         "steps-compare": part_steps_compare}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--minutes", type=float, default=None, help="training budget of the teacher / distill part")
    a = ap.parse_args()
    t0 = time.time()
    run_parts("guidance.json", "guidance.py", PARTS, a.only, a.minutes)
    print(f"total {time.time() - t0:.0f}s")
