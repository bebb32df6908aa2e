"""``fewstep demo``: distil a shipped teacher with SiD for a few minutes and compare.

Writes OUT/sid/ (the run folder), OUT/teacher_vs_student.png (side by side),
OUT/results.json, and prints a table: metric, NFE and sampling speed of the
teacher (Heun, 35 NFE) and of the one-step SiD student.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import FewstepError

ASSETS = Path(__file__).parent / "assets" / "teachers"


def shipped_teacher(name: str) -> Path:
    p = ASSETS / name
    if not (p / "model.safetensors").is_file():
        have = sorted(d.name for d in ASSETS.iterdir()) if ASSETS.is_dir() else []
        made = {"8gaussians", "25gaussians", "digits", "mnist5k"}  # what benchmarks/teachers.py trains
        how = (f"; train it with `python benchmarks/teachers.py --only {name}`" if name in made
               else "; train a teacher of your own with `fewstep teacher --data NAME --out DIR` and pass DIR")
        raise FewstepError(f"no shipped teacher {name!r} (shipped: {', '.join(have) or 'none'}){how}")
    return p


def _row(name, r, fd_key):
    """One table line: NFE, FD at n, FD at the floor's sample count, throughput."""
    if fd_key is None:  # points: exact log-likelihood
        return f"{name:22s} {r['nfe']:>4d} {r['log_likelihood']:>10.3f} {'':>12s} {r['samples_per_second']:>12.1f}"
    at_floor = r.get(f"{fd_key}_at_floor_n")
    second = f"{at_floor:>12.3f}" if at_floor is not None else f"{'':>12s}"
    return f"{name:22s} {r['nfe']:>4d} {r[fd_key]:>10.3f} {second} {r['samples_per_second']:>12.1f}"


def run_demo(out: str | Path, *, data: str = "digits", minutes: float = 4.0, n_eval: int = 1000,
             seed: int = 0, batch_size: int = 32, lr: float | None = None) -> dict:
    import torch

    from .config import to_dict
    from .eval.plots import save_comparison_grid, save_scatter
    from .eval.runner import evaluate_model
    from .methods.sid import SiD, SiDConfig
    from .model import load_model
    from .training.loop import TrainConfig, Trainer

    if not minutes > 0:
        raise FewstepError(f"--minutes must be > 0 (the SiD budget), got {minutes:g}")
    if n_eval < 1:
        raise FewstepError(f"--n must be >= 1 (samples per evaluation), got {n_eval}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = shipped_teacher(data)
    teacher = load_model(teacher_dir)
    print(f"[1/3] SiD distillation of the shipped {data} teacher for {minutes:g} min "
          f"(one-step student; run folder {out / 'sid'})", file=sys.stderr)
    cfg = SiDConfig(**({"lr_g": lr, "lr_fake": lr} if lr else {}))
    train = TrainConfig(**{**to_dict(TrainConfig()), **SiD.train_defaults, "total_kimg": 100000.0,
                           "max_minutes": minutes, "batch_size": batch_size, "seed": seed,
                           "snapshot_every_kimg": 5.0, "checkpoint_every_kimg": 5.0})
    torch.manual_seed(seed)
    method = SiD.create(cfg, teacher=teacher)
    run_config = {"method": "sid", "method_config": to_dict(cfg), "teacher": str(teacher_dir), "data": data,
                  "command": f"fewstep demo --data {data} --minutes {minutes}"}
    summary = Trainer(method, train, out / "sid", run_config=run_config).run_training()
    student = load_model(out / "sid")
    print(f"[2/3] evaluating teacher (Heun, 35 NFE) and student (1 NFE) on {n_eval} samples each",
          file=sys.stderr)
    t_res = evaluate_model(teacher, n=n_eval, seed=seed + 1)
    s_res = evaluate_model(student, n=n_eval, seed=seed + 1)
    fd_key = next((k for k in t_res if k.startswith("fd_") and "floor" not in k and "at_floor" not in k), None)
    if teacher.data_info.kind == "images":
        k = 64
        t_img = teacher.sample(k, seed=seed + 2).x
        s_img = student.sample(k, seed=seed + 2).x
        save_comparison_grid({f"teacher · Heun · NFE {t_res['nfe']}": t_img,
                              f"SiD student · NFE 1 · {summary['kimg']:.0f} kimg": s_img},
                             out / "teacher_vs_student.png", title=f"fewstep demo: {data}")
    else:  # 2-D points: the student's samples over the teacher's
        k = 2000
        save_scatter(student.sample(k, seed=seed + 2).x, out / "teacher_vs_student.png",
                     reference=teacher.sample(k, seed=seed + 2).x,
                     title=f"fewstep demo: {data} · SiD student (blue, NFE 1) over teacher (grey, NFE {t_res['nfe']})")
    speedup = s_res["samples_per_second"] / t_res["samples_per_second"]
    results = {"data": data, "distill_minutes": minutes, "distill_kimg": summary["kimg"],
               "distill_iterations": summary["iterations"], "teacher": t_res, "student": s_res,
               "student_speedup": speedup}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    floor_key = fd_key.replace("fd_", "fd_floor_") if fd_key else None
    print("[3/3] results", file=sys.stderr)
    n, nf = t_res.get("n", n_eval), t_res.get("n_floor", n_eval)
    head = "loglik" if fd_key is None else f"FD n={n}"
    second = f"FD n={nf}" if fd_key and nf != n else ""  # the FD at the floor's n, when it has fewer images
    print(f"\n{'model':22s} {'NFE':>4s} {head:>10s} {second:>12s} {'samples/s':>12s}")
    print(_row("teacher (Heun)", t_res, fd_key))
    print(_row("SiD student (1 step)", s_res, fd_key))
    if floor_key and floor_key in t_res:
        print(f"{'real-data floor':22s} {'':>4s} {'':>10s} {t_res[floor_key]:>12.3f}   "
              f"(held-out vs train images, n={nf})")
    if fd_key:
        print(f"FD = Fréchet distance in the feature space of fewstep's {fd_key[3:]} classifier (not Inception FID)")
    print(f"\nstudent samples {speedup:.0f}x faster than the teacher; "
          f"picture: {out / 'teacher_vs_student.png'}; numbers: {out / 'results.json'}")
    return results
