import logging
import warnings

import pytest

from lightning_ewc.app.idx import DATA_ENV, data_dir


def pytest_configure(config):
    # Lightning is chatty about trainer set-up; keep test output to what matters.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture(scope="session")
def mnist_dir():
    root = data_dir()
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST IDX files not found under {root}/MNIST/raw/: set ${DATA_ENV} to the folder that holds them")
    return root
