"""Reading small files as data: size checked before reading, every failure a clear error naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence


def check_file_size(path: Path, what: str, limit: int, error: type[Exception] = ValueError,
                    missing: type[Exception] = FileNotFoundError) -> int:
    """The size of ``path`` in bytes, before anything is read: ``missing`` if it is no file, ``error`` if it is
    over ``limit`` bytes. Messages name ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what}: file {path} not found")
    size = path.stat().st_size
    if size > limit:
        raise error(f"{what}: {path} is {size} bytes; expected at most {limit}")
    return size


def read_bytes_limited(path: Path, what: str, limit: int, error: type[Exception] = ValueError) -> bytes:
    """The bytes of ``path``, after ``check_file_size``."""
    check_file_size(path, what, limit, error)
    return Path(path).read_bytes()


def read_json_limited(path: Path, what: str, limit: int, error: type[Exception] = ValueError) -> Any:
    """The parsed JSON of ``path`` (size-checked as ``read_bytes_limited``); ``error`` if it is not UTF-8 JSON."""
    raw = read_bytes_limited(path, what, limit, error)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as problem:  # ValueError: JSON errors, huge integers
        raise error(f"{what}: {path} is not valid JSON ({type(problem).__name__}: {problem})") from None


def check_serialized_class(document: Any, source: str, class_names: Sequence[str],
                           registered_names: Sequence[str | None], error: type[Exception] = ValueError) -> dict:
    """Check a serialized keras object (``{"class_name", "config", ...}``) against a class-name allowlist, before
    anything else of it is read; return its inner ``config`` dict."""
    if not isinstance(document, Mapping):
        raise error(f"{source}: expected a serialized keras object (a JSON object), found {type(document).__name__}")
    class_name, registered = document.get("class_name"), document.get("registered_name")
    if class_name not in class_names or registered not in registered_names:
        raise error(f"{source}: class {class_name!r} (registered as {registered!r}) is not allowed; expected one "
                    f"of {tuple(class_names)} registered as one of {tuple(n for n in registered_names if n)}")
    config = document.get("config")
    if not isinstance(config, Mapping):
        raise error(f"{source}: expected a 'config' object, found {type(config).__name__}")
    return dict(config)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
