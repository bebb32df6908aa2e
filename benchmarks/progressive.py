#!/usr/bin/env python
"""Progressive distillation against simply taking fewer steps (Salimans & Ho's central figure),
plus TRACT and knowledge distillation at one step — one run, one table.

Two teachers:

* an exact Gaussian-mixture teacher (``mixture:ring8``; DESIGN §2): its samples are
  scored by exact log-likelihood under the true density, sliced Wasserstein distance
  to true samples and mode coverage, with no teacher error in the way. Mixtures have
  no weights, so every student starts from the same small MLP denoiser, pre-trained
  briefly with the EDM loss on mixture samples;
* an image teacher (MNIST-5k: ``shipped:mnist5k`` if present, else one trained here;
  ``--quick`` uses sklearn digits): scored by FD in the feature space of fewstep's
  own classifier (not Inception FID) with its floor at the same sample count.

For N in 8, 4, 2, 1 the table puts the progressive student of N steps beside the
teacher sampled with DDIM at the same N steps on the same clipped cosine grid, then
TRACT and KD at one step, and the teacher's reference sampler (Heun 18, 35 NFE).
Every row states its NFE, the images seen and wall-clock of its training, and its
sampling time. All students are trained through the CLI (``fewstep distill ...``)
in one process, one after the other, on this machine.

    python benchmarks/progressive.py --quick           # ~2 minutes on 2 CPU cores
    python benchmarks/progressive.py                   # the full run (~90 min on one CPU core)
    python benchmarks/progressive.py --device cuda

Results: ``benchmarks/results/progressive[-quick].{json,md}``; run folders under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fewstep.cli import main as fewstep  # noqa: E402
from fewstep.errors import FewstepError  # noqa: E402
from fewstep.eval.runner import evaluate_model  # noqa: E402
from fewstep.methods.step_distill import sampling_recipe  # noqa: E402
from fewstep.model import FewstepModel, copy_model, load_model, save_model  # noqa: E402

SETTINGS = {
    "quick": {
        "mixture": "ring8", "mix_init_net": {"name": "mlp", "dim": 2, "width": 64, "depth": 2, "emb_channels": 32},
        "mix_init_kimg": 30, "mix_batch": 256, "mix_start": 16, "mix_kimg_per_stage": 25, "mix_tract": [16, 4, 1],
        "mix_lr": 2e-3, "mix_pairs": 4000, "mix_n_eval": 4000,
        "image_data": "digits", "image_teacher_kimg": 60,
        "image_teacher_net": {"name": "mlp", "dim": 64, "width": 256, "depth": 3, "emb_channels": 64},
        "image_batch": 128, "image_start": 8, "image_kimg_per_stage": 8, "image_tract": [8, 2, 1],
        "image_lr": 5e-4, "image_pairs": 1000, "image_n_eval": 300,
    },
    "full": {
        "mixture": "ring8", "mix_init_net": {"name": "mlp", "dim": 2, "width": 256, "depth": 3, "emb_channels": 64},
        "mix_init_kimg": 200, "mix_batch": 512, "mix_start": 64, "mix_kimg_per_stage": 150, "mix_tract": [64, 8, 1],
        "mix_lr": 1e-3, "mix_pairs": 50000, "mix_n_eval": 20000,
        "image_data": "mnist5k", "image_teacher_kimg": 1000, "image_teacher_net": None,
        "image_batch": 64, "image_start": 64, "image_kimg_per_stage": 65, "image_tract": [64, 8, 1],
        "image_lr": 2e-4, "image_pairs": 10000, "image_n_eval": 1000,
    },
}
STEPS = (8, 4, 2, 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train_args(batch: int, total_kimg: float, device: str, seed: int = 0) -> list[str]:
    return ["--batch-size", str(batch), "--total-kimg", f"{total_kimg:g}", "--device", device, "--seed", str(seed),
            "--no-progress", "--snapshot-every-kimg", "1000000", "--checkpoint-every-kimg", f"{max(total_kimg / 4, 1):g}",
            "--log-every-kimg", f"{max(total_kimg / 50, 0.1):g}"]


def run_cli(args: list[str]) -> float:
    log("fewstep " + " ".join(args))
    t0 = time.perf_counter()
    rc = fewstep(args)
    if rc != 0:
        raise SystemExit(f"`fewstep {' '.join(args)}` failed with exit code {rc}")
    return time.perf_counter() - t0


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def with_recipe(model: FewstepModel, recipe: dict) -> FewstepModel:
    m = copy_model(model)
    m.config = {**m.config, "sampling": recipe}
    return m


def measure(model: FewstepModel, data: str, n: int, seed: int, key: str) -> dict:
    r = evaluate_model(model, n=n, seed=seed, data=data, batch_size=500)
    out = {"nfe": r["nfe"], "n_samples": r["n_samples"], "sample_seconds": r["sample_seconds"]}
    if r.get("kind") == "mixture":
        out.update(log_likelihood=r["log_likelihood"], ref_log_likelihood=r["ref_log_likelihood"],
                   sliced_wasserstein=r["sliced_wasserstein"], mode_coverage=r["mode_coverage"],
                   mmd_rbf=r["mmd_rbf"])
        out["score"] = r["log_likelihood"]
    else:
        name = r["feature_net"]
        out.update({"feature_net": name, "fd": r[f"fd_{name}"], "fd_floor": r.get(f"fd_floor_{name}"),
                    "precision": r[f"precision_{name}"], "recall": r[f"recall_{name}"]})
        out["score"] = r[f"fd_{name}"]
    return out


def distill_suite(tag: str, teacher_spec: str, data: str, init: str | None, s: dict, p: str, work: Path,
                  device: str) -> dict:
    """Progressive, TRACT and KD runs for one teacher; returns {run name: (folder, summary, cli seconds)}."""
    runs = {}
    common = ["--teacher", teacher_spec, "--data", data] + (["--init", init] if init else [])
    start, per_stage = s[f"{p}_start"], s[f"{p}_kimg_per_stage"]
    n_stages = len(bin(start)) - 3  # log2(start) halvings down to 1
    total = n_stages * per_stage
    lr = s[f"{p}_lr"]
    batch = s[f"{p}_batch"]
    out = work / tag / "progressive"
    secs = run_cli(["distill", "progressive", "--out", str(out), "--start-steps", str(start), "--lr", f"{lr:g}",
                    "--kimg-per-stage", f"{per_stage:g}", *common, *train_args(batch, total, device)])
    runs["progressive"] = (out, summary(out), secs)
    out = work / tag / "tract"
    iv = s[f"{p}_tract"]
    secs = run_cli(["distill", "tract", "--out", str(out), "--intervals", ",".join(map(str, iv)), "--lr", f"{lr:g}",
                    *common, *train_args(batch, total, device)])
    runs["tract"] = (out, summary(out), secs)
    out = work / tag / "kd"
    secs = run_cli(["distill", "kd", "--out", str(out), "--n-pairs", str(s[f"{p}_pairs"]), "--lr", f"{lr:g}",
                    "--chunk", str(max(s[f"{p}_pairs"] // 8, 1)), *common, *train_args(batch, total, device)])
    runs["kd"] = (out, summary(out), secs)
    return runs


def table_rows(tag: str, teacher: FewstepModel, runs: dict, data: str, n: int, start: int, tract_iv: list[int],
               seed: int = 0) -> list[dict]:
    rows = []

    def add(method: str, steps, model: FewstepModel, train: dict | None):
        r = measure(model, data, n, seed, tag)
        rows.append({"teacher": tag, "method": method, "steps": steps, **r,
                     "train_kimg": None if train is None else train["kimg"],
                     "train_seconds": None if train is None else train["train_seconds"]})
        log(f"{tag:8s} {method:22s} steps={steps!s:>3s} NFE={r['nfe']:>3d} score={r['score']:.4g}")

    add("teacher (Heun, Karras)", 18, with_recipe(teacher, {"sampler": "heun", "steps": 18, "schedule": "karras"}), None)
    if start not in STEPS:
        add("teacher (DDIM, cosine)", start, with_recipe(teacher, sampling_recipe(start)), None)
    prog_dir, prog_sum, _ = runs["progressive"]
    for k in STEPS:
        add("teacher (DDIM, cosine)", k, with_recipe(teacher, sampling_recipe(k)), None)
        folder = prog_dir / "stages" / f"steps-{k}"
        if folder.is_dir():
            add("progressive", k, load_model(folder), prog_sum)
    tract_dir, tract_sum, _ = runs["tract"]
    for k in tract_iv[1:]:
        add("TRACT", k, load_model(tract_dir / "stages" / f"steps-{k}"), tract_sum)
    kd_dir, kd_sum, _ = runs["kd"]
    add("KD (Luhman)", 1, load_model(kd_dir), kd_sum)
    return rows


def mixture_part(s: dict, work: Path, device: str) -> list[dict]:
    from fewstep.diffusion.denoiser import EDMPrecond
    from fewstep.nets.build import build_net

    spec = f"mixture:{s['mixture']}"
    teacher = load_model(spec, device=device)
    # the shared starting point of every student: a small MLP denoiser pre-trained with the EDM loss
    init_dir = work / "mixture" / "init"
    net = s["mix_init_net"]
    init_run = work / "mixture" / "init-run"
    run_cli(["teacher", "--data", spec, "--out", str(init_run), "--net", json.dumps(net), "--lr", "2e-3",
             "--lr-rampup-kimg", "1", *train_args(s["mix_batch"], s["mix_init_kimg"], device)])
    init = load_model(init_run)
    save_model(init_dir, init.denoiser, init.config)
    assert isinstance(init.denoiser, EDMPrecond) and build_net(net) is not None
    runs = distill_suite("mixture", spec, spec, str(init_dir), s, "mix", work, device)
    return table_rows(f"mixture:{s['mixture']}", teacher, runs, spec, s["mix_n_eval"], s["mix_start"], s["mix_tract"])


def image_part(s: dict, work: Path, device: str, teacher_path: str | None) -> list[dict]:
    data = s["image_data"]
    if teacher_path is None:
        try:
            from fewstep.demo import shipped_teacher

            teacher_path = str(shipped_teacher(data))
            log(f"using the shipped {data} teacher {teacher_path}")
        except (FewstepError, ImportError):
            teacher_path = None
    if teacher_path is None:
        run = work / "images" / "teacher"
        args = ["teacher", "--data", data, "--out", str(run),
                *train_args(s["image_batch"], s["image_teacher_kimg"], device)]
        if s["image_teacher_net"]:
            args += ["--net", json.dumps(s["image_teacher_net"])]
        run_cli(args)
        teacher_path = str(run)
    teacher = load_model(teacher_path, device=device)
    runs = distill_suite("images", teacher_path, data, None, s, "image", work, device)
    return table_rows(data, teacher, runs, data, s["image_n_eval"], s["image_start"], s["image_tract"])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Progressive distillation vs. fewer steps ({meta['mode']})", "",
             f"{meta['machine']}; torch {meta['torch']}; device {meta['device']}; total {meta['seconds']:.0f} s. "
             "Mixture: exact log-likelihood (higher is better; true samples reach `ref`), sliced Wasserstein "
             "(SW) to true samples, mode coverage. Images: FD in fewstep's own feature space (not Inception "
             "FID), with the floor of held-out real images at the same n. Train = images seen and wall-clock "
             "of the whole run that produced the student (all stages; KD includes generating its pairs).", ""]
    lines += ["| teacher | method | steps | NFE | log-lik / FD | SW / floor | modes / prec | train kimg | train s | sample s (n) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "log_likelihood" in r:
            a, b, c = f"{r['log_likelihood']:.3f}", f"{r['sliced_wasserstein']:.4f}", f"{r['mode_coverage']:.2f}"
        else:
            a, b, c = f"{r['fd']:.3f}", f"{r['fd_floor']:.3f}" if r.get("fd_floor") is not None else "", f"{r['precision']:.2f}"
        tk = "" if r["train_kimg"] is None else f"{r['train_kimg']:.0f}"
        ts = "" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(f"| {r['teacher']} | {r['method']} | {r['steps']} | {r['nfe']} | {a} | {b} | {c} | {tk} | {ts} | "
                     f"{r['sample_seconds']:.2f} ({r['n_samples']}) |")
    ref = [r["ref_log_likelihood"] for r in rows if "ref_log_likelihood" in r]
    if ref:
        lines += ["", f"True mixture samples: log-lik {ref[0]:.3f} (ref)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings that finish in about two minutes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="run folders (default: runs/bench-progressive[-quick]; wiped first)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--image-teacher", default=None, help="image teacher (default: shipped, else trained here)")
    ap.add_argument("--only", choices=["mixture", "images"], default=None, help="run one part only")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    s = SETTINGS[mode]
    work = Path(args.work or ROOT / "runs" / f"bench-progressive{'-quick' if args.quick else ''}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("FEWSTEP_THREADS", os.environ.get("OMP_NUM_THREADS", ""))
    t0 = time.perf_counter()
    rows = []
    if args.only in (None, "mixture"):
        rows += mixture_part(s, work, args.device)
    if args.only in (None, "images"):
        rows += image_part(s, work, args.device, args.image_teacher)
    meta = {"mode": mode, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} threads)",
            "seconds": time.perf_counter() - t0, "settings": s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "progressive-quick" if args.quick else "progressive"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = markdown(rows, meta)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
