"""Fetching the original MNIST / Fashion-MNIST IDX ``.gz`` files with the standard library alone.

torchvision is not a dependency (and does not import beside every torch build), and the job is small: four files per
dataset, each checked against its published md5. Every file goes to a temporary name in the target folder and is
renamed only once its md5 matches, so an interrupted or corrupt download never sits under the name the reader looks
for, and ranks or processes that download into the same folder at once cannot see each other's half-written files.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MIRRORS_ENV = "LIGHTNING_EWC_MIRRORS"

# The published md5 of each original file (the same sums torchvision's ``resources`` list).
RESOURCES: dict[str, dict[str, str]] = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# Tried in this order (torchvision's list): yann.lecun.com has refused or throttled requests at times, hence S3 first.
MIRRORS: dict[str, tuple[str, ...]] = {
    "MNIST": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

_CHUNK = 1 << 20
# Some hosts answer urllib's default agent with 403.
_HEADERS = {"User-Agent": "lightning-ewc"}


class DownloadError(FileNotFoundError):
    """No mirror delivered a file whose md5 matches: the dataset is still missing.

    A FileNotFoundError, so that callers that handle missing data (the app's runner among them) handle this too.
    """


def mirrors_for(name: str, mirrors: Sequence[str] | str | None = None) -> list[str]:
    """The base URLs to try for ``name``, in order: ``mirrors`` if given, else ``$LIGHTNING_EWC_MIRRORS``, else the
    public ones. A string holds several URLs separated by spaces or commas; ``{name}`` in a URL becomes the dataset
    name, so that one setting can serve both datasets (e.g. ``http://host/data/{name}/raw/``)."""
    if mirrors is None:
        mirrors = os.environ.get(MIRRORS_ENV) or MIRRORS.get(name, ())
    if isinstance(mirrors, str):
        mirrors = re.split(r"[\s,]+", mirrors.strip())
    bases = [m.replace("{name}", name) for m in mirrors if m]
    # A base without its trailing slash would lose its last path segment when the file name is appended.
    return [b if b.endswith("/") else b + "/" for b in bases]


def download(
    name: str, root: str | os.PathLike, mirrors: Sequence[str] | str | None = None, timeout: float = 60.0
) -> Path:
    """Fetch the missing IDX files of ``name`` (``MNIST`` or ``FashionMNIST``) into ``root/<name>/raw/``.

    Files already there are kept as they are (the reader checks their header and length); each downloaded file must
    match its published md5, else the next mirror is tried. ``timeout`` bounds each wait on the network, in seconds.
    Returns the folder; raises :class:`DownloadError` naming every URL tried and why it failed.
    """
    if name not in RESOURCES:
        raise ValueError(f"no download known for {name!r}; download=true works for {', '.join(RESOURCES)}")
    raw = Path(root) / name / "raw"
    missing = {f: md5 for f, md5 in RESOURCES[name].items() if not (raw / f).exists()}
    if not missing:
        return raw
    bases = mirrors_for(name, mirrors)
    if not bases:
        raise ValueError(f"no mirror to download {name} from: the mirror list is empty (see ${MIRRORS_ENV})")
    raw.mkdir(parents=True, exist_ok=True)
    for filename, md5 in missing.items():
        _fetch(filename, md5, raw, bases, timeout)
    log.info("%s: downloaded %s into %s", name, ", ".join(missing), raw)
    return raw


def _fetch(filename: str, md5: str, raw: Path, bases: list[str], timeout: float) -> None:
    target = raw / filename
    failures = []
    for base in bases:
        url = base + filename
        reason = _fetch_from(url, md5, target, timeout)
        if reason is None:
            log.info("fetched %s (md5 ok) into %s", url, raw)
            return
        log.warning("could not use %s: %s", url, reason)
        failures.append(f"  {url}: {reason}")
    raise DownloadError(
        f"could not download {filename} into {raw}/; tried, in order:\n" + "\n".join(failures) + "\n"
        f"Copy the original {filename} (md5 {md5}) by hand into {raw}/, or point ${MIRRORS_ENV} (space-separated "
        f"base URLs; {{name}} stands for the dataset's name) at mirrors that serve it"
    )


def _fetch_from(url: str, md5: str, target: Path, timeout: float) -> str | None:
    """Download ``url`` to ``target`` if its md5 matches: None on success, else why not (and nothing left behind).

    Only the mirror's failures become reasons; a folder we cannot write to raises, since no other mirror would help.
    """
    # A name of our own, hidden and unlike the target's, so that no reader or glob mistakes it for the real file.
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=_HEADERS), timeout=timeout)
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        return f"request failed ({err.reason})"
    except (OSError, http.client.HTTPException, ValueError) as err:  # reset, timeout, malformed reply or URL
        return f"request failed ({type(err).__name__}: {err})"
    try:
        with response, open(part, "xb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:  # reset, timeout, body shorter than announced
                    return f"transfer broke off after {size} bytes ({type(err).__name__}: {err})"
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            # http.client ends a chunked read quietly when the connection drops early; the announced length tells.
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.isdigit() and size != int(announced):
                return f"transfer broke off after {size} of the {announced} bytes announced"
            out.flush()
            os.fsync(out.fileno())  # the rename below must not publish a file whose bytes are still in flight
        if digest.hexdigest() != md5:
            got = digest.hexdigest()
            return f"md5 of the {size} bytes received is {got}, not the published {md5} (corrupt or truncated)"
        os.replace(part, target)
        return None
    finally:
        part.unlink(missing_ok=True)
