"""Shared test setup: the `plugin_path` fixture (defined in plugin_env.py) and one CPU thread per test."""

from collections.abc import Iterator

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
