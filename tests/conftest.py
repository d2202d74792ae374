import os

import pytest
import torch

# Two CI cores: keep each test process to one intra-op thread so parallel workers don't oversubscribe.
torch.set_num_threads(int(os.environ.get("VLMAMBA_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
