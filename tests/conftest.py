import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from kvserve.model.loader import default_model_path
    return default_model_path()
