import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_mlp():
    return {"name": "mlp", "dim": 2, "width": 32, "depth": 2, "emb_channels": 16}
