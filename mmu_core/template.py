"""`mmu new-backend NAME`: write a backend distribution from the template in templates/backend.

The result is a directory an author can `pip install -e` at once: the entry point, a
backend that already passes the conformance suite, and a pytest configuration that runs
the suite. Everything or nothing is written (a temporary directory renamed into place).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from mmu_core.errors import InvalidConfig

TEMPLATE = Path(__file__).parent / "templates" / "backend"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
RESERVED = ("tdp", "shadow", "legacy")


def render(text: str, name: str) -> str:
    return text.replace("{{name}}", name)


def files(name: str) -> dict[str, str]:
    """{relative path: contents} of the distribution for backend `name`."""
    out = {}
    for src in sorted(TEMPLATE.rglob("*.tmpl")):
        rel = render(str(src.relative_to(TEMPLATE))[: -len(".tmpl")], name)
        if rel == "backend.py":
            rel = f"{name}_mmu/__init__.py"
        out[rel] = render(src.read_text(), name)
    return out


def new_backend(name: str, dest: Path) -> Path:
    """Write the distribution for backend `name` into the new directory `dest`."""
    if not _NAME.match(name):
        raise InvalidConfig("name", f"{name!r} must be lowercase letters, digits and _, "
                            "starting with a letter (it names a Python package)")
    if name in RESERVED:
        raise InvalidConfig("name", f"{name!r} is a built-in configuration's name")
    dest = Path(dest)
    if dest.exists():
        raise InvalidConfig("dir", f"{dest} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent if dest.parent.exists()
                                else None))
    try:
        for rel, text in files(name).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        shutil.move(str(tmp), str(dest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
