"""Secrets generated on first start and kept on disk, so restarts and workers share them."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


def load_or_create_secret(directory: str | Path, name: str) -> str:
    """The secret in directory/name, created with mode 0600 if absent.

    The value is written to a temp file and linked into place: concurrent first starts
    never see a half-written file, and the one link that wins is what all of them use.
    """
    path = Path(directory) / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text().strip()
