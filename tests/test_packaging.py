"""The Dockerfile builds what pyproject.toml packages (no docker daemon is needed to check that):
the image went stale once, when core/ and jobs/ were split out and only three packages were copied."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dockerfile_copies_every_package_pyproject_installs():
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in includes}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages <= copied, f"the Dockerfile does not copy {sorted(packages - copied)}"


def test_the_dockerfiles_python_steps_import_what_exists():
    for code in re.findall(r'python -c "([^"]+)"', (ROOT / "Dockerfile").read_text()):
        imports = "; ".join(part for part in code.split(";") if part.strip().startswith(("from ", "import ")))
        done = subprocess.run([sys.executable, "-c", imports], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{imports!r}: {done.stderr[-500:]}"
