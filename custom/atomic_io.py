"""Atomic file writes: write under a temporary name in the target folder, then ``os.replace`` it into place.

A killed run then leaves either the old file or the new one, never a half-written file that a later step
(resume, training, a user's pandas) would trust. Temporary names start with ``.tmp-`` so clean-ups find them.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes, so format-by-extension writers work); on a clean
    exit move it onto ``path``, on an error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
