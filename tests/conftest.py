import os
import warnings

# Before anything imports triton (lightning does): Triton kernels run on the CPU under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
