"""Shared test setup: the `plugin_path` fixture (defined in plugin_env.py) and one CPU thread per test."""

import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

pytest_plugins = ["plugin_env"]


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread() -> Iterator[None]:
    """Tiny test models run far faster on one thread (no OpenMP spin-waiting); tests that time a real run
    (the quickstart) set their own thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_as_they_were() -> Iterator[None]:
    """A test that builds a run from a recipe with another run.threads leaves the next test one thread."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a fresh folder, shut down after the test: (base URL, folder).

    Download code is tested against this, never the internet.
    """
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
