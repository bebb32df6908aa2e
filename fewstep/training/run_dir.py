"""Run folders: config, log, stats, samples, checkpoints, the exported model.

    RUN/
      config.json        resolved run config (method, its config, training config, command)
      log.txt            human-readable log
      stats.jsonl        one JSON line per log interval (losses, kimg, timing, skips)
      metrics.jsonl      in-run evaluations (metric vs images seen and wall-clock)
      samples/           sample pictures over time (grids or scatter plots)
      checkpoints/       training states state-<iteration>/ (resume)
      model/             the student: model.safetensors + config.json (EMA weights)
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .checkpoint import atomic_write_text


class RunDir:
    def __init__(self, root: str | Path, *, main_process: bool = True):
        self.root = Path(root)
        self.main = main_process
        if self.main:
            for sub in ("samples", "checkpoints"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(f"fewstep.run.{self.root.resolve()}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if self.main and not self.logger.handlers:
            fh = logging.FileHandler(self.root / "log.txt")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            self.logger.addHandler(fh)
        self._tb = None

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def log(self, msg: str, echo: bool = False) -> None:
        if not self.main:
            return
        self.logger.info(msg)
        if echo:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def append_jsonl(self, name: str, record: dict) -> None:
        if not self.main:
            return
        with open(self.root / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_jsonl(self, name: str) -> list[dict]:
        p = self.root / name
        if not p.is_file():
            return []
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill: ignore
        return out

    def truncate_jsonl(self, name: str, max_nimg: int) -> None:
        """Drop records written after the checkpoint we resume from."""
        if not self.main:
            return
        keep = [r for r in self.read_jsonl(name) if r.get("nimg", 0) <= max_nimg]
        atomic_write_text(self.root / name, "".join(json.dumps(r) + "\n" for r in keep))

    def write_json(self, name: str, obj: dict) -> None:
        if self.main:
            atomic_write_text(self.root / name, json.dumps(obj, indent=2) + "\n")

    # ---- tensorboard (optional) --------------------------------------------------------------
    def enable_tensorboard(self) -> None:
        if not self.main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            from ..errors import FewstepError

            raise FewstepError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        self._tb = SummaryWriter(log_dir=str(self.root / "tensorboard"))

    def scalars(self, values: dict[str, float], nimg: int) -> None:
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, global_step=nimg)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
