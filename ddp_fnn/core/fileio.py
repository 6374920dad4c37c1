"""Every file ddp-fnn writes goes through ``atomic_write``, and every JSON through ``dumps``.

``atomic_write``: a temporary file in the same directory, flushed and fsync'ed, renamed
over the final name with ``os.replace``, then the directory fsync'ed: a crash or a full
disk leaves either the old file or the new one, never half of one. (A process killed
mid-write leaves a ``.NAME.tmp-PID`` file, which checkpoint pruning removes.)

``dumps``: strict JSON (RFC 8259), which strict
parsers (JavaScript's JSON.parse, jq, Go's encoding/json) accept.

Python's json module writes NaN and Infinity as the bare words ``NaN`` and ``Infinity`` by
default, which are not JSON. Here a missing or non-finite number is ``null`` (a run with
``--eval-fraction 0`` has no eval loss; a run that trained no step has no step time), and
``allow_nan=False`` makes any that slipped through an error instead of a bad file.
numpy scalars and arrays become plain numbers and lists.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ddp_fnn.core.errors import ConfigError


def clean(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):        # numpy scalars and arrays, tensors
        return clean(value.tolist())
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of ``clean(value)``, never writing NaN or Infinity."""
    return json.dumps(clean(value), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """Parse as strictly as a JavaScript or jq reader would (NaN/Infinity rejected): what
    the tests use to read what ddp-fnn wrote."""
    def reject(word: str):
        raise ValueError(f"not JSON: {word}")
    return json.loads(text, parse_constant=reject)


def atomic_write(path: Path | str, content: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary file,
    e.g. ``lambda f: torch.save(obj, f)``) to ``path``: afterwards ``path`` holds the
    old content or all of the new, and a failure leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)      # the rename itself is durable once the directory is
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path | str, value: Any, **kwargs) -> None:
    """``value`` as strict JSON (``dumps``) with a final newline, written atomically."""
    atomic_write(path, dumps(value, **kwargs) + "\n")


def check_writable_dir(path: Path | str, option: str) -> None:
    """``path`` is a writable directory, or can be created as one: ConfigError otherwise.
    Called before any work, so a run that fails here has touched nothing."""
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {path}: not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: not writable")
