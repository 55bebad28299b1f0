"""Reading small files as data: size checked before reading, every failure a clear error naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def read_json_limited(path: Path, what: str, limit: int, error: type[Exception] = ValueError) -> Any:
    """The parsed JSON of ``path``; ``error`` (naming ``what`` and the path) if it is missing, over ``limit``
    bytes (checked before reading) or not valid UTF-8 JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file {path} not found")
    size = path.stat().st_size
    if size > limit:
        raise error(f"{what}: {path} is {size} bytes; expected at most {limit}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{what}: {path} is not valid JSON ({problem})") from None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
