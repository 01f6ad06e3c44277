"""The checked-in protobuf classes must match proto/dchan.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
GENERATED = ROOT / "src" / "trio_dchan" / "_proto"


def _generate(out: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_betterproto2_out={out}",
            "--python_betterproto2_opt=client_generation=async,server_generation=async",
            str(PROTO_DIR / "dchan.proto"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_checked_in_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("betterproto2_compiler")
    _generate(tmp_path)
    fresh = _tree(tmp_path)
    current = _tree(GENERATED)
    assert fresh.keys() == current.keys(), "regenerate with `nox -s proto`"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale generated files {stale}: regenerate with `nox -s proto`"
