#!/usr/bin/env python3
"""Run a command inside the project's virtual environment, creating or updating it first.

    python3 scripts/dev.py lesion-ray run jobs/quickstart.yaml
    python3 scripts/dev.py pytest

The environment is `.venv` (or $LESION_RAY_VENV). It is (re)installed only when
pyproject.toml or constraints.txt changed since the last install, using the pinned
versions in constraints.txt so pip never backtracks.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LESION_RAY_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".lesion-ray-installed"


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _pip(*args: str) -> None:
    cmd = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print(f"[dev] pip install {' '.join(args)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_env() -> None:
    if not (BIN / "python").exists():
        print(f"[dev] creating virtual environment {VENV}", file=sys.stderr, flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    has_torch = subprocess.run([str(BIN / "python"), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        # The pinned build first: an unpinned torch would pull a multi-GB CUDA build.
        torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                         if line.startswith("torch=="))
        _pip(torch_pin)
    _pip("-c", "constraints.txt", "-e", ".[test]")
    STAMP.write_text(_fingerprint())


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_env()
    command, *args = sys.argv[1:]
    # The command runs as in the activated venv: its console scripts (lesion-ray, pytest, ruff) first on the PATH.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(VENV)}
    os.chdir(ROOT)
    program = BIN / command
    if program.exists():
        os.execve(str(program), [command, *args], env)
    os.execvpe(command, [command, *args], env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
