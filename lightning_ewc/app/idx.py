"""Reading the original MNIST / Fashion-MNIST IDX ``.gz`` files straight into tensors.

Written by hand because torchvision, the usual reader, is not a dependency (and decodes sample by sample through PIL);
the format is a tiny header and raw bytes, so the whole dataset lands in one uint8 tensor in milliseconds. Missing
files can be fetched with ``download=True`` (:mod:`lightning_ewc.app.download`, standard library only).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_ewc.app.download import download as _download

DATA_ENV = "LIGHTNING_EWC_DATA"
FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Where datasets live: ``override`` if given, else ``$LIGHTNING_EWC_DATA``, else ``./data``.

    The layout is torchvision's: ``ROOT/MNIST/raw/*.gz``, ``ROOT/FashionMNIST/raw/*.gz``.
    """
    # Resolved now, so that a relative setting keeps meaning the same folder in subprocesses and Hydra run dirs.
    return Path(override if override is not None else os.environ.get(DATA_ENV, "data")).expanduser().resolve()


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """One IDX file (gzipped or not) as a tensor of its stored shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=True).reshape(shape))


def load_idx_dataset(
    name: str = "MNIST",
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = False,
    mirrors: Sequence[str] | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``MNIST`` or ``FashionMNIST``.

    ``download=True`` fetches missing files (both splits) into ``ROOT/<name>/raw/`` from ``mirrors`` (base URLs; by
    default ``$LIGHTNING_EWC_MIRRORS``, else the public mirrors), each checked against its published md5.
    """
    raw = data_dir(root) / name / "raw"
    paths = [raw / f for f in FILES[train]]
    missing = [p for p in paths if not p.exists()]
    if missing and download:
        _download(name, data_dir(root), mirrors=mirrors)
        missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: looked for {', '.join(str(p) for p in missing)}. Put the original IDX .gz files in "
            f"{raw}/ (torchvision's layout), point ${DATA_ENV} (or the stream's data_dir) at the folder that holds "
            f"{name}/raw/, or set download=true to fetch them from the public mirrors"
        )
    images, labels = (read_idx(p) for p in paths)
    return images, labels.long()
