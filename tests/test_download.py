"""download=true without torchvision: the standard-library downloader against a real HTTP server on loopback.

The server serves the shared data folder (the original files) under several prefixes, each one a mirror that behaves
well or badly, and records every request; no test reaches the network or replaces urllib.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_ewc.app.download import MIRRORS, MIRRORS_ENV, RESOURCES, DownloadError, download, mirrors_for
from lightning_ewc.app.idx import data_dir, load_idx_dataset
from lightning_ewc.app.streams import split_fashion_mnist, split_mnist

MNIST_FILES = list(RESOURCES["MNIST"])


def _body(kind: str, data: bytes) -> tuple[bytes, int]:
    """What a mirror of this kind sends for ``data``: (bytes sent, Content-Length announced)."""
    if kind == "corrupt":  # right length, one byte flipped in the middle
        mid = len(data) // 2
        data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        return data, len(data)
    if kind == "truncated":  # a shorter file, honestly announced as such
        return data[: len(data) // 2], len(data) // 2
    if kind == "short":  # the full length announced, then the connection drops halfway
        return data[: len(data) // 2], len(data)
    return data, len(data)


class _Handler(http.server.BaseHTTPRequestHandler):
    # GET /<kind>/<Name>/raw/<file>, kind one of good | corrupt | truncated | short | stall; anything else is a 404.
    # stall sends the first half, then waits for the test to set server.release before sending the rest.
    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        kind, _, rest = self.path.lstrip("/").partition("/")
        path = (server.root / rest).resolve()
        known = ("good", "corrupt", "truncated", "short", "stall")
        if kind not in known or server.root not in path.parents or not path.is_file():
            self.send_error(404)
            return
        body, length = _body(kind, path.read_bytes())
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if kind == "stall":
            self.wfile.write(body[: len(body) // 2])
            server.release.wait(timeout=60)
            body = body[len(body) // 2 :]
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(mnist_dir):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.root = data_dir()
    srv.requests = []
    srv.release = threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def refused_url():
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_originals(raw: Path, name: str = "MNIST") -> None:
    for filename in RESOURCES[name]:
        assert (raw / filename).read_bytes() == (data_dir() / name / "raw" / filename).read_bytes(), filename
    assert files_in(raw) == sorted(RESOURCES[name])  # nothing else: no temporary file left over


def test_published_md5_match_the_originals(mnist_dir):
    for name, files in RESOURCES.items():
        for filename, md5 in files.items():
            path = data_dir() / name / "raw" / filename
            if not path.exists():
                pytest.skip(f"{path} not here to check its md5 against")
            assert hashlib.md5(path.read_bytes()).hexdigest() == md5, path


def test_download_fetches_the_originals_that_the_reader_loads(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_ewc.app.download")
    raw = download("MNIST", tmp_path, mirrors=[f"{server.url}/good/{{name}}/raw/"])

    assert raw == tmp_path / "MNIST" / "raw"
    assert_originals(raw)
    assert sorted(server.requests) == sorted(f"/good/MNIST/raw/{f}" for f in MNIST_FILES)
    assert f"into {raw}" in caplog.text  # says where the files went
    for train in (True, False):
        images, labels = load_idx_dataset("MNIST", train=train, root=tmp_path)
        expected_images, expected_labels = load_idx_dataset("MNIST", train=train)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


@pytest.mark.parametrize(
    "kind, reason",
    [("corrupt", "not the published"), ("truncated", "not the published"), ("short", "broke off")],
)
def test_a_bad_mirror_is_refused_and_the_next_one_used(server, tmp_path, caplog, kind, reason):
    caplog.set_level(logging.INFO, logger="lightning_ewc.app.download")
    # The bad mirror's URL has no trailing slash: the file name must still go below it, not replace its last part.
    raw = download("MNIST", tmp_path, mirrors=[f"{server.url}/{kind}/MNIST/raw", f"{server.url}/good/MNIST/raw/"])

    assert_originals(raw)
    for f in MNIST_FILES:  # every file tried the bad mirror first, then the good one
        assert server.requests.index(f"/{kind}/MNIST/raw/{f}") < server.requests.index(f"/good/MNIST/raw/{f}")
    refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refusals) == len(MNIST_FILES) and all(reason in m and f"/{kind}/" in m for m in refusals)


def test_a_file_in_flight_never_shows_under_its_real_name(server, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    failed = []

    def run():
        try:
            download("MNIST", tmp_path, mirrors=[f"{server.url}/stall/MNIST/raw/"])
        except BaseException as err:  # handed to the test's thread below
            failed.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for _ in range(600):  # until half of the first file has arrived in its temporary file (or 60 s pass)
        partial = [p for p in raw.glob(".*.part") if p.stat().st_size > 0] if raw.exists() else []
        if partial or not thread.is_alive():
            break
        time.sleep(0.1)
    assert partial, "the download never started"
    assert files_in(raw) == [partial[0].name]  # nothing under a name the reader would open
    with pytest.raises(FileNotFoundError):
        load_idx_dataset("MNIST", root=tmp_path)

    server.release.set()
    thread.join(timeout=60)
    assert not failed and not thread.is_alive()
    assert_originals(raw)


def test_when_every_mirror_fails_the_error_names_them_and_the_folder_and_leaves_nothing(server, tmp_path,
                                                                                         refused_url):
    mirrors = [refused_url, f"{server.url}/missing/MNIST/raw/", f"{server.url}/corrupt/MNIST/raw/",
               f"{server.url}/short/MNIST/raw/"]
    with pytest.raises(DownloadError) as err:
        download("MNIST", tmp_path, mirrors=mirrors)

    raw = tmp_path / "MNIST" / "raw"
    message = str(err.value)
    first = MNIST_FILES[0]
    for mirror in mirrors:
        assert mirror + first in message
    for reason in ("request failed", "HTTP 404", "not the published", "broke off"):
        assert reason in message
    assert str(raw) in message and "by hand" in message and MIRRORS_ENV in message
    assert isinstance(err.value, FileNotFoundError)  # what the app's runner passes on to the user as it is
    assert files_in(raw) == []  # neither a partial file under its real name nor a temporary one


def test_files_present_are_trusted_and_make_no_request(server, tmp_path):
    good = f"{server.url}/good/{{name}}/raw/"
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in MNIST_FILES[:2]:
        (raw / f).write_bytes((data_dir() / "MNIST" / "raw" / f).read_bytes())

    download("MNIST", tmp_path, mirrors=[good])
    assert sorted(server.requests) == sorted(f"/good/MNIST/raw/{f}" for f in MNIST_FILES[2:])  # only what was missing
    assert_originals(raw)

    server.requests.clear()
    download("MNIST", tmp_path, mirrors=[good])
    load_idx_dataset("MNIST", train=False, root=tmp_path, download=True, mirrors=[good])
    assert server.requests == []


def test_the_app_stream_downloads_from_the_mirrors_in_the_environment(server, tmp_path, monkeypatch, refused_url):
    # Through the builder the app calls with stream.download=true; the first mirror is down, {name} picks the folder.
    monkeypatch.setenv(MIRRORS_ENV, f"{refused_url} {server.url}/good/{{name}}/raw/")
    stream = split_fashion_mnist(data_dir=tmp_path, download=True, num_tasks=2, subsample=10, test_subsample=10)

    assert_originals(tmp_path / "FashionMNIST" / "raw", "FashionMNIST")
    assert all(r.startswith("/good/FashionMNIST/raw/") for r in server.requests)
    assert len(stream.tasks) == 2


def test_the_app_stream_reports_a_failed_download_as_missing_data(server, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, f"{server.url}/missing/{{name}}/raw/")
    with pytest.raises(FileNotFoundError, match="could not download") as err:
        split_mnist(data_dir=tmp_path, download=True)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def test_mirror_lists(monkeypatch):
    monkeypatch.delenv(MIRRORS_ENV, raising=False)
    assert mirrors_for("MNIST") == list(MIRRORS["MNIST"])
    assert mirrors_for("MNIST")[0].startswith("https://ossci-datasets.s3.amazonaws.com/")  # torchvision's order
    assert mirrors_for("FashionMNIST") == list(MIRRORS["FashionMNIST"])

    monkeypatch.setenv(MIRRORS_ENV, "http://a/{name}/raw, file:///srv/{name}")
    assert mirrors_for("FashionMNIST") == ["http://a/FashionMNIST/raw/", "file:///srv/FashionMNIST/"]
    assert mirrors_for("MNIST", mirrors="http://b/") == ["http://b/"]  # the argument wins over the environment
    assert mirrors_for("MNIST", mirrors=["http://c", "http://d/"]) == ["http://c/", "http://d/"]


def test_unknown_dataset_and_empty_mirror_list_are_refused(tmp_path):
    with pytest.raises(ValueError, match="MNIST, FashionMNIST"):
        download("KMNIST", tmp_path, mirrors=["http://127.0.0.1:1/"])
    with pytest.raises(ValueError, match="mirror list is empty"):
        download("MNIST", tmp_path, mirrors=[])
    assert files_in(tmp_path) == []
