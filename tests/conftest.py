import os

import pytest
import torch

os.environ.setdefault("SLIMKIT_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist():
    import slimkit.data

    return slimkit.data.load("mnist10k")


@pytest.fixture(scope="session")
def digits():
    import slimkit.data

    return slimkit.data.load("digits")
