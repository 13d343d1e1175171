"""The suite never depends on, or writes into, the checkout's data/ and runs/ (which the README's steps fill)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import REPO_ROOT, tree_state


def test_every_test_starts_in_an_empty_folder_outside_the_checkout() -> None:
    cwd = Path.cwd().resolve()
    assert not cwd.is_relative_to(REPO_ROOT.resolve())
    assert list(cwd.iterdir()) == []
    assert not Path("data/cifar10-train.h5").exists() and not Path("runs").exists()


def test_tree_state_notices_a_new_a_changed_and_a_removed_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert tree_state(root) == {}
    root.mkdir()
    empty = tree_state(root)
    assert list(empty) == ["data"]
    (root / "sub").mkdir()
    (root / "sub" / "a.h5").write_bytes(b"12345")
    state = tree_state(root)
    assert state["data/sub/a.h5"][0] == 5 and state != empty
    assert tree_state(root) == state  # reading changes nothing
    stat = (root / "sub" / "a.h5").stat()
    os.utime(root / "sub" / "a.h5", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten in place
    assert tree_state(root) != state
    (root / "sub" / "a.h5").unlink()
    assert "data/sub/a.h5" not in tree_state(root)
