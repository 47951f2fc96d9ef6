import lightning as L
import pytest

from lightning_sparse.data import DigitsDataModule, PythonSourceDataModule


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def python_source() -> PythonSourceDataModule:
    dm = PythonSourceDataModule(block_size=16, batch_size=8, max_chars=20_000)
    dm.setup()
    return dm


@pytest.fixture
def fast_trainer():
    """A factory of 2-batch CPU trainers without logger or checkpoints."""

    def make(**kwargs) -> L.Trainer:
        defaults = {
            "fast_dev_run": 2,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        }
        return L.Trainer(**{**defaults, **kwargs})

    return make
