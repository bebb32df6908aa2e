"""Run by torchrun in tests/test_training.py: 2 processes train one teacher with gloo.

``ddp_run.py OUT``: train; write each rank's initial and final weights.
``ddp_run.py OUT budget``: train to a wall-clock budget instead, with rank 1's clock running
three times as fast as rank 0's (as rank 1's does when rank 0 pauses for snapshots and
evaluations): the ranks must still stop at the same iteration, not wait for each other forever.
``ddp_run.py OUT nan``: rank 1's loss is NaN at its third step only: every rank must skip that step.
``ddp_run.py OUT eval``: with in-run evaluations on rank 0 that compute a Fréchet distance
(torchmetrics): they must not wait for the other rank.
``ddp_run.py OUT resume``: train straight through (OUT/run), and again stopped after 7 iterations
and resumed by a fresh trainer (OUT/split); write both final weights.
"""
import os
import sys
from pathlib import Path

import torch

from fewstep.data import load_dataset
from fewstep.methods.base import DataInfo
from fewstep.teachers.training import EDMTeacher, TeacherConfig
from fewstep.training.loop import TrainConfig, Trainer

out = Path(sys.argv[1])
mode = sys.argv[2] if len(sys.argv) > 2 else ""
rank = int(os.environ["RANK"])
budget = mode == "budget"
cfg = TrainConfig(total_kimg=1000.0 if budget else 2.56, batch_size=64, ema_halflife_kimg=0.5, progress=False,
                  snapshot_every_kimg=100, checkpoint_every_kimg=100, max_minutes=0.05 if budget else None,
                  eval_every_kimg=0.64 if mode == "eval" else 0.0)
ds = load_dataset("8gaussians", split="train", n=2000)
if budget and rank == 1:
    import time
    import types

    import fewstep.training.loop as loop

    t0 = time.perf_counter()
    loop.time = types.SimpleNamespace(perf_counter=lambda: t0 + 3 * (time.perf_counter() - t0))


def trainer(run: str) -> Trainer:
    torch.manual_seed(100 + rank)  # deliberately different initial weights per rank: the loop must broadcast
    net = {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}
    m = EDMTeacher(TeacherConfig(net=net), DataInfo(kind="points", sample_shape=(2,), name="8gaussians"))
    if mode == "nan" and rank == 1:
        calls, loss_fn = [0], m.loss

        def nan_once(batch):
            calls[0] += 1
            loss, stats = loss_fn(batch)
            return (loss * float("nan") if calls[0] == 3 else loss), stats

        m.loss = nan_once
    return Trainer(m, cfg, str(out / run), dataset=ds, evaluator=fd_evaluator if mode == "eval" else None)


def fd_evaluator(model) -> dict:
    from fewstep.eval.metrics import frechet_distance

    with torch.no_grad():
        x = model.denoiser(torch.randn(64, 2), torch.full((64,), 1.0))
    return {"fd": frechet_distance(x, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))}


def save(t: Trainer, name: str) -> None:
    state = {f"net.{k}": v for k, v in t.method.denoiser.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in t.ema.ema.state_dict().items()})
    torch.save(state, out / f"{name}{rank}.pt")


t = trainer("run")
torch.save({k: v.clone() for k, v in t.method.denoiser.state_dict().items()}, out / f"init{rank}.pt")
t.run_training()
save(t, "rank")
if mode == "resume":
    trainer("split").run_training(max_iterations=7)
    t = trainer("split")  # a fresh process's view: everything from the checkpoint
    t.run_training()
    save(t, "resumed")
