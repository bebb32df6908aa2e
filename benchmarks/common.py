"""Helpers shared by the benchmark scripts (run folders, environment, JSON output)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "benchmarks"


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": threads(),
            "cpu_count": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def threads() -> int:
    """CPU threads for benchmark work: FEWSTEP_THREADS if set, else 2 (the whole machine)."""
    return int(os.environ.get("FEWSTEP_THREADS", "2"))


def fewstep(*args: str) -> float:
    """Run the fewstep CLI as a user would; returns wall-clock seconds."""
    env = {**os.environ, "FEWSTEP_THREADS": str(threads())}
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fewstep", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def read_curve(run: Path) -> list[dict]:
    """A run's in-run evaluations, one dict per line of RUN/metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def write_json(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {p}")
    return p


def record_part(json_name: str, script: str, part: str, res: dict, minutes: float | None = None) -> dict:
    """Merge one part's result into RESULTS/json_name (other parts, perhaps run side by side, stay), with the
    command that made it and the environment; returns the merged results."""
    import fcntl

    path = RESULTS / json_name
    cmd = (f"FEWSTEP_THREADS={threads()} " if threads() != 2 else "") + f"python benchmarks/{script} --only {part}" \
        + (f" --minutes {minutes:g}" if minutes else "")
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / f".{json_name}.lock", "w") as lock:  # parts run side by side may finish at the same moment
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}  # read just before writing: the other may have run
        results[part] = {**res, "benchmark_command": cmd, "environment": environment()}
        write_json(json_name, results)
    return results


def run_parts(json_name: str, script: str, parts: dict, only, minutes: float | None = None) -> None:
    """Run each part in ``only`` (``parts[name](minutes)`` returns its result; ``minutes`` is the --minutes override
    or None) and record it in RESULTS/json_name as it finishes, printing a result's ``table`` if it has one."""
    for part in only:
        t0 = time.time()
        res = parts[part](minutes)
        record_part(json_name, script, part, res, minutes)
        if "table" in res:
            print(res["table"], flush=True)
        print(f"{part}: {time.time() - t0:.0f}s", flush=True)


def bench_main(doc: str, json_name: str, script: str, parts: dict, default_only: list[str] | None,
               minutes_help: str) -> None:
    """A benchmark script's command line: ``--only PART ...`` (the keys of ``parts``; ``default_only`` when not
    given, required when that is None) and ``--minutes`` (the budget override), torch on :func:`threads`
    threads, then :func:`run_parts`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=default_only, required=default_only is None, choices=list(parts))
    ap.add_argument("--minutes", type=float, default=None, help=minutes_help)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(threads())
    run_parts(json_name, script, parts, args.only, args.minutes)
