"""Files written whole or not at all: atomic_write, for checkpoints, summaries, logs, tables and plots."""

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """write(temporary) in path's folder, flushed to the disk, then renamed over path: a reader
    never sees a half-written file, an interrupted write leaves no temporary behind, and after a
    power loss path holds the old file or the new one, whole.

    The temporary keeps path's suffix (matplotlib picks the format by it) and has a name of its
    own (two processes may write one file); it is created as open() creates any file, with the
    mode the umask leaves (mkstemp's would be readable by its owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(temporary)
        fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync(path.parent)  # the rename itself
    return path


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
