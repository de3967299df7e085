"""mypy --strict on sdk/ and ops/ under their import names.

The folders install as ``kvfuse`` and ``kvfuse.ops`` through setuptools' package-dir
mapping, which mypy cannot follow; this lays out ``build/typecheck/kvfuse`` as symlinks to
the sources and checks that package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    stage = ROOT / "build" / "typecheck"
    shutil.rmtree(stage, ignore_errors=True)
    pkg = stage / "kvfuse"
    pkg.mkdir(parents=True)
    for src in (ROOT / "sdk").iterdir():
        if src.suffix in {".py", ".typed"} or (src.is_dir() and (src / "__init__.py").exists()):
            (pkg / src.name).symlink_to(src, target_is_directory=src.is_dir())
    (pkg / "ops").symlink_to(ROOT / "ops", target_is_directory=True)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "kvfuse"]
    return subprocess.call(cmd, cwd=stage)


if __name__ == "__main__":
    raise SystemExit(main())
