"""Writing results atomically: a temp file in the target's folder, then os.replace, so a killed run never leaves
a half-written PNG, JSON or NPZ behind (at worst a stray hidden .tmp file)."""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path

import numpy as np


def atomic_write(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """A new hidden file next to path, opened for writing. Created with mode 0666 so the kernel applies the umask:
    the usual permissions without reading the umask (os.umask sets it too, racing with other threads)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue


def write_json(path, obj) -> None:
    """Strict JSON: NaN and Infinity are not JSON, so they raise ValueError here instead of being written."""
    atomic_write(path, (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


def write_npz(path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())
