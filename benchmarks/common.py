"""Helpers shared by the benchmark scripts (run folders, environment, JSON output)."""
from __future__ import annotations

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


def write_json(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / name
    p.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {p}")
    return p
