"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``bench``, ``docs``, ``proto``.

Each session installs what it needs into its own virtualenv under ``.nox/``,
so the sessions work from a clean clone with nothing but nox installed.
Extra arguments after ``--`` go to the underlying tool, e.g.
``nox -s tests -- tests/test_codec.py -x``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
ROOT = Path(__file__).parent
LINT_PATHS = ["src", "tests", "benchmarks", "noxfile.py"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (the same command as the README and .ci/run)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/ (configured in pyproject.toml)."""
    session.install("-e", ".[test]", "mypy>=1.11")
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run every benchmarks/bench_*.py in turn, each in its own process."""
    session.install("-e", ".[test,bench]")
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    if not scripts:
        session.error("no benchmarks/bench_*.py found")
    for script in scripts:
        session.log(f"--- {script.name}")
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings (e.g. broken links) fail the build."""
    session.install("-e", ".", "mkdocs>=1.6", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(python=PYTHON)
def proto(session: nox.Session) -> None:
    """Regenerate src/trio_dchan/_proto/ from proto/dchan.proto (grpclib stubs).

    The compiler is pinned to the version the checked-in code was made with:
    tests/transport/test_proto_generated.py regenerates with the project's
    environment and fails if the output differs.
    """
    session.install("betterproto2-compiler==0.10.1", "grpcio-tools>=1.66")
    session.run(
        "python",
        "-m",
        "grpc_tools.protoc",
        "-I",
        "proto",
        "--python_betterproto2_out=src/trio_dchan/_proto",
        "--python_betterproto2_opt=client_generation=async,server_generation=async",
        "proto/dchan.proto",
    )
