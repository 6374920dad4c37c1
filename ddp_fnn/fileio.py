"""Every JSON ddp-fnn writes goes through ``dumps``: strict JSON (RFC 8259), which strict
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
from typing import Any


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
