import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def llava_sdpa():
    from tiny_models import tiny_llava
    return tiny_llava("sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    from tiny_models import tiny_llava
    return tiny_llava("eager")
