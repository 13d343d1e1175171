"""Shared test setup: the `plugin_path` fixture (defined in plugin_env.py), one CPU thread per test, a
working directory outside the checkout for every test, whose data/ and runs/ the suite must leave untouched,
only the ctcore distribution's plugins (plus the fakes a test adds), its components' `registry`, and the wandb logger
offline."""

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, tree_state

from ctcore import load_registry
from ctcore.registry import DISABLE_ENV, ONLY_ENV, Registry

pytest_plugins = ["plugin_env"]
WANDB_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """The suite sees the components of the ctcore distribution only, whatever other plugins are installed or
    disabled in the caller's environment: lists and did-you-mean messages are pinned. Set before the test modules
    are imported, so module-level registries and the CLI in subprocesses see the same; `plugin_path` adds the fake
    distributions a test installs. OpenBLAS gets one thread, as torch does."""
    os.environ[ONLY_ENV] = "ctcore"
    os.environ.pop(DISABLE_ENV, None)
    # scipy's OpenBLAS on one thread, like torch (_one_cpu_thread), set before scipy.linalg loads it; subprocesses
    # inherit it: with two threads next to another worker, a 2048-d sqrtm (FID) took 39 CPU-s against 19 with one
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    # the wandb logger: every run offline (WANDB_MODE overrides a recipe's mode), quiet, its caches in a temporary
    # folder, and its server an address where nothing listens, so that nothing the suite does can reach W&B
    wandb_home = tempfile.mkdtemp(prefix="ctcore-tests-wandb-")
    os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_BASE_URL": "http://127.0.0.1:9",
                       "WANDB_CACHE_DIR": wandb_home, "WANDB_CONFIG_DIR": wandb_home, "WANDB_DATA_DIR": wandb_home})
    config.stash[WANDB_HOME] = wandb_home


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the temporary folder of wandb's caches (its debug logs) that pytest_configure made."""
    if WANDB_HOME in config.stash:
        shutil.rmtree(config.stash[WANDB_HOME], ignore_errors=True)


CHECKOUT_DIRS = ("data", "runs")
"""What a user of the checkout fills by following the README (`ctcore data import`, the quickstart)."""


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_alone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run the suite from a temporary folder (so relative paths such as a recipe's data/cifar10-train.h5 or the
    default runs/<name> never reach the checkout) and without a memory override from the caller's environment;
    fail the session if anything under the checkout's data/ or runs/ appeared, vanished or changed."""
    before = {name: tree_state(REPO_ROOT / name) for name in CHECKOUT_DIRS}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        mp.delenv("CTCORE_MEMORY_LIMIT", raising=False)
        yield
    changed = []
    for name in CHECKOUT_DIRS:
        after = tree_state(REPO_ROOT / name)
        changed += sorted(p for p in before[name].keys() | after.keys() if before[name].get(p) != after.get(p))
    if changed:
        pytest.fail(f"the tests changed {len(changed)} path(s) in the checkout {REPO_ROOT}: {', '.join(changed[:5])}; "
                    f"tests must write under tmp_path only", pytrace=False)


@pytest.fixture(autouse=True)
def _fresh_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts in its own empty folder: a relative path one test writes is never seen by the next."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The ctcore distribution's components, loaded once per test module through the real entry points."""
    return load_registry()


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
