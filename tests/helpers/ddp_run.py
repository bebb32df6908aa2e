"""Run by torchrun in tests/test_training.py: 2 processes train one teacher with gloo."""
import sys
from pathlib import Path

import torch

from fewstep.data import load_dataset
from fewstep.methods.base import DataInfo
from fewstep.teachers.training import EDMTeacher, TeacherConfig
from fewstep.training.loop import TrainConfig, Trainer

out = Path(sys.argv[1])
rank = int(__import__("os").environ["RANK"])
torch.manual_seed(100 + rank)  # deliberately different initial weights per rank: the loop must broadcast
net = {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}
m = EDMTeacher(TeacherConfig(net=net), DataInfo(kind="points", sample_shape=(2,), name="8gaussians"))
cfg = TrainConfig(total_kimg=2.56, batch_size=64, ema_halflife_kimg=0.5, progress=False,
                  snapshot_every_kimg=100, checkpoint_every_kimg=100)
ds = load_dataset("8gaussians", split="train", n=2000)
trainer = Trainer(m, cfg, str(out / "run"), dataset=ds)
torch.save({k: v.clone() for k, v in m.denoiser.state_dict().items()}, out / f"init{rank}.pt")
trainer.run_training()
state = {f"net.{k}": v for k, v in m.denoiser.state_dict().items()}
state.update({f"ema.{k}": v for k, v in trainer.ema.ema.state_dict().items()})
torch.save(state, out / f"rank{rank}.pt")
