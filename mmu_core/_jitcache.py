"""Where numba caches compiled code: a directory keyed by a hash of the core's sources.

numba's on-disk cache (njit(cache=True)) is invalidated only when the file holding the jitted
function changes, not when a function or constant it calls from another module does: after an
edit to the walker, the CPU loop that inlines it would run stale machine code. Keying the
cache directory by the contents of every core module makes any core change start afresh.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def configure() -> None:
    import numba

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    numba.config.CACHE_DIR = str(base / "mmu_core-numba" / digest.hexdigest()[:16])
