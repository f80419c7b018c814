"""Where a result came from: the commit of the sparsemem source that produced it."""

import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
"""The folder above the package: a git checkout when sparsemem runs from one."""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=SOURCE).stdout.strip()


def source_commit() -> str:
    """The short commit of the checkout sparsemem runs from, with "-dirty" when tracked files
    differ from it; "unknown" outside a git checkout (an installed wheel) or without git."""
    try:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return _git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
