"""Developer and CI sessions. `nox -s lint typecheck tests` is the everyday gate; `e2e` needs root."""

from __future__ import annotations

import filecmp
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PROTO_OUT = ROOT / "src" / "localdisk" / "_proto"


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and the import-linter layer contracts."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "src", "tests", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "noxfile.py")
    session.run("lint-imports")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests and examples."""
    session.install("-e", ".[dev,test]")
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on the host. Tests that need the UML sandbox skip here, with a reason; `e2e` runs them."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not uml", *session.posargs)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate the CSI stubs from protos/csi.proto and fail if they differ from what is committed."""
    session.install("-e", ".[dev]", "grpcio-tools")
    with tempfile.TemporaryDirectory() as tmp:
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_betterproto2_out={tmp}",
            "--python_betterproto2_opt=client_generation=async,server_generation=async",
            "protos/csi.proto",
        )
        diff = filecmp.dircmp(tmp, PROTO_OUT)
        changed = _differences(diff)
        if changed:
            if "--write" in session.posargs:
                shutil.rmtree(PROTO_OUT)
                shutil.copytree(tmp, PROTO_OUT)
                session.log(f"regenerated: {changed}")
            else:
                session.error(
                    f"generated stubs differ from the committed ones: {changed}; run `nox -s proto -- --write`"
                )


def _differences(diff: filecmp.dircmp[str], prefix: str = "") -> list[str]:
    found = [prefix + name for name in diff.diff_files + diff.left_only + diff.right_only if name != "__pycache__"]
    for name, sub in diff.subdirs.items():
        if name != "__pycache__":
            found += _differences(sub, f"{prefix}{name}/")
    return found
