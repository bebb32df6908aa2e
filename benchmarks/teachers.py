"""Train the reference teachers, ship them, and measure quality vs NFE for every sampler.

    python benchmarks/teachers.py                 # all teachers (≈ 45 min on 2 CPU cores)
    python benchmarks/teachers.py --only digits   # one of: 8gaussians 25gaussians digits mnist5k

Each teacher is trained with `fewstep teacher` (run folder under runs/benchmarks/),
copied to fewstep/assets/teachers/<name>/ (safetensors + JSON), and evaluated with
euler / heun / ddim / dpm-solver++(2M) at NFE 1 … 35+ on the same sample count.
MNIST-5k also gets the 5,000-sample class histogram of the feature classifier.
Results: benchmarks/results/teachers.json (merged per teacher).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, RUNS, environment, fewstep, threads, write_json  # noqa: E402

TEACHERS = {
    # name: (dataset, CLI training options, evaluation sample count)
    "8gaussians": ("8gaussians", ["--total-kimg", "2000", "--batch-size", "256", "--lr", "2e-3",
                                  "--max-minutes", "5", "--ema-halflife-kimg", "20"], 5000),
    "25gaussians": ("25gaussians", ["--total-kimg", "3000", "--batch-size", "256", "--lr", "2e-3",
                                    "--max-minutes", "6", "--ema-halflife-kimg", "20"], 5000),
    "digits": ("digits", ["--total-kimg", "2000", "--batch-size", "64", "--lr", "1e-3",
                          "--max-minutes", "8", "--ema-halflife-kimg", "10"], 300),
    "mnist5k": ("mnist5k", ["--total-kimg", "5000", "--batch-size", "64", "--lr", "1e-3",
                            "--max-minutes", "28", "--ema-halflife-kimg", "10"], 1000),
}
STEPS = {"euler": [1, 2, 4, 8, 16, 35], "ddim": [1, 2, 4, 8, 16, 35], "dpmpp-2m": [1, 2, 4, 8, 16, 35],
         "heun": [1, 2, 3, 5, 9, 18]}  # heun: NFE = 2·steps − 1


def train(name: str) -> dict:
    data, opts, _ = TEACHERS[name]
    run = RUNS / f"teacher-{name}"
    secs = fewstep("teacher", "--data", data, "--out", str(run), *opts, "--no-progress",
                   "--snapshot-every-kimg", "50", "--checkpoint-every-kimg", "50")
    summary = json.loads((run / "summary.json").read_text())
    dest = ROOT / "fewstep" / "assets" / "teachers" / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "model", dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["provenance"] = {**cfg.get("provenance", {}), "run": f"runs/benchmarks/teacher-{name}",
                         "command": f"python benchmarks/teachers.py --only {name}"}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"train_seconds": summary["train_seconds"], "wall_seconds": round(secs, 1), "kimg": summary["kimg"],
            "iterations": summary["iterations"], "sec_per_iter": summary["sec_per_iter"],
            "command": " ".join(["fewstep", "teacher", "--data", data, "--out", str(run.relative_to(ROOT)), *opts])}


def evaluate(name: str, parts=("curves", "histogram"), previous: dict | None = None) -> dict:
    from fewstep.eval.runner import evaluate_model, headline
    from fewstep.model import load_model

    _, _, n = TEACHERS[name]
    model = load_model(ROOT / "fewstep" / "assets" / "teachers" / name)
    out = dict(previous or {})
    curves = {}
    for sampler, steps_list in (STEPS.items() if "curves" in parts else ()):
        rows = []
        for steps in steps_list:
            r = evaluate_model(model, n=n, seed=1, sampler=sampler, steps=steps)
            rows.append({"steps": steps, **headline(r)})
            print(f"  {name} {sampler:9s} steps={steps:3d} NFE={r['nfe']:3d} "
                  + " ".join(f"{k}={v:.4g}" for k, v in headline(r).items() if k.startswith(("fd_", "log_likelihood", "mode"))),
                  flush=True)
        curves[sampler] = rows
    if "curves" in parts:
        out.update({"n_samples": n, "curves": curves})
    if name == "mnist5k" and "histogram" in parts:  # ten classes, balanced: the feature classifier's histogram of 5,000 samples
        r = evaluate_model(model, n=5000, seed=2, sampler="heun", steps=18)
        out["heun35_n5000"] = {k: v for k, v in r.items() if "class_" in k or k.startswith(("fd", "nfe", "n"))}
        out["heun35_n5000"]["command"] = "python benchmarks/teachers.py --only mnist5k --eval-only --parts histogram"
        out["feature_net"] = json.loads((ROOT / "fewstep" / "assets" / "feature_nets" / "mnist5k.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(TEACHERS), help="teachers to (re)make (default all)")
    ap.add_argument("--eval-only", action="store_true", help="skip training; evaluate the shipped teachers")
    ap.add_argument("--parts", default="curves,histogram", help="evaluation parts: curves, histogram (mnist5k)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(threads())
    path = RESULTS / "teachers.json"
    results = json.loads(path.read_text()) if path.is_file() else {"teachers": {}}
    for name in args.only or list(TEACHERS):
        t0 = time.time()
        entry = results["teachers"].get(name, {})
        if not args.eval_only:
            entry["training"] = train(name)
        entry["evaluation"] = evaluate(name, tuple(args.parts.split(",")), entry.get("evaluation"))
        entry["environment"] = environment()
        results = json.loads(path.read_text()) if path.is_file() else {"teachers": {}}  # merge: runs may overlap
        results["teachers"][name] = entry
        results["command"] = "python benchmarks/teachers.py"
        write_json("teachers.json", results)
        print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
