import os

import pytest
import torch

# Tests use tiny tensors: one thread is faster than two (and CI has 2 cores for everything).
torch.set_num_threads(int(os.environ.get("FEWSTEP_TEST_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_mlp():
    return {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}
