"""Errors that the CLI turns into one clear message and an exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path


class CtcoreError(Exception):
    """Base of every expected failure; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def render(self) -> str:
        return self.message


class UsageError(CtcoreError):
    """The user asked for something that cannot work as asked (exit 2)."""

    exit_code = 2


class PackageUnavailable(UsageError):
    """A component needs an optional package that is not installed (`tensorboard` without its extra): exit 2.

    `ctcore.testing.check_all` skips such a component with the message, so a stock install passes."""


class RecipeError(UsageError):
    """A recipe with problems, each `section.key: message`: one problem is one line (`file: section.key: ...`),
    several are a header line plus one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        if n == 1:
            super().__init__(f"{source}: {self.problems[0]}")
            return
        header = f"{source}: {n} problems in the recipe"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


class UnknownComponentError(UsageError):
    """A component name that no installed plugin provides."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        self.kind, self.name, self.available = kind, name, available
        super().__init__(unknown_name_message(f"{kind}", name, available))


class PluginError(CtcoreError):
    """A plugin that breaks the registry (duplicate names, invalid classes)."""


class RunError(CtcoreError):
    """A runtime failure: missing data, a corrupt checkpoint, an occupied run directory (exit 1)."""


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """The closest candidate to `word`, or None when nothing is close."""
    import difflib

    norm = {c.replace("_", "-").lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.replace("_", "-").lower(), list(norm), n=1, cutoff=0.6)
    return norm[hits[0]] if hits else None


def unknown_name_message(what: str, name: str, available: list[str] | tuple[str, ...]) -> str:
    """'unknown metric 'x'; did you mean 'y'? available: a, b' — shared by the registry and the recipe reader."""
    msg = f"unknown {what} {name!r}"
    guess = did_you_mean(name, available)
    if guess is not None:
        msg += f"; did you mean {guess!r}?"
    msg += f" (available: {', '.join(sorted(available)) or 'none installed'})"
    return msg


def near_path(path: str | Path) -> str | None:
    """The existing path a mistyped one most likely meant: every component that does not exist replaced by the
    closest name in its folder (`did_you_mean`; hidden names only for a hidden one), in the form it was typed
    (relative stays relative); None when the path exists or some component has no close name."""
    import itertools
    import os

    path = Path(path)
    parts = path.parts
    if not parts:
        return None
    folder, rest = (Path(parts[0]), parts[1:]) if path.is_absolute() else (Path(), parts)
    changed = False
    try:
        for part in rest:
            if os.path.lexists(folder / part):
                folder = folder / part
                continue
            if not folder.is_dir():
                return None
            with os.scandir(folder) as entries:  # a huge folder: its first 10,000 names
                names = [e.name for e in itertools.islice(entries, 10_000)
                         if part.startswith(".") or not e.name.startswith(".")]
            guess = did_you_mean(part, names)
            if guess is None:
                return None
            folder, changed = folder / guess, True
    except OSError:  # a folder that cannot be listed, a name too long for the file system
        return None
    return str(folder) if changed else None


def path_not_found(subject: str, path: str | Path, fix: str = "") -> str:
    """The one message for a path a user named that does not exist: `<subject> not found`, then ` (did you mean
    '<path>'?)` when `near_path` finds one, then `; <fix>`. E.g. `checkpoint 'runs/quickstrat' not found (did you
    mean 'runs/quickstart'?)`."""
    guess = near_path(path)
    return f"{subject} not found" + (f" (did you mean {guess!r}?)" if guess else "") + (f"; {fix}" if fix else "")
