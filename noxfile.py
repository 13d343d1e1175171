"""nox sessions: `nox -s tests` (the suite) and `nox -s lint` (ruff). CPU torch is installed first."""

import nox

nox.options.sessions = ["tests", "lint"]
TORCH = "torch==2.13.0"  # the CPU build; installing it first keeps pip from resolving a CUDA build


@nox.session
def tests(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
