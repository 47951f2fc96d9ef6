import os
import warnings

# Before anything imports triton (lightning does): Triton kernels run on the CPU under the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_sparse.callbacks import MagnitudePruning  # noqa: E402
from lightning_sparse.data import DigitsDataModule  # noqa: E402
from lightning_sparse.models import MLP  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A 2-step fit of MLP(64 -> 32 -> 10) on digits, pruned to half of its 16x16 blocks."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = MLP(input_shape=(1, 8, 8), hidden=(32,), scheduler=None)
    callback = MagnitudePruning(density=0.5, pattern="16x16", include=["net.1.weight"])
    trainer = pl.Trainer(
        max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", model
