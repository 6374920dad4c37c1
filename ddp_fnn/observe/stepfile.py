"""The step file: every optimizer step of one rank, one strict-JSON object a line.

``DIR/steps-rank{R}.jsonl`` with ``--output DIR`` (``--steps-file PATH`` elsewhere,
``--no-steps-file`` for none). Lines are ``StepRecord.to_json()`` (docs/metrics.md lists
the keys). Records are buffered and appended at log intervals and at the end, never
inside a step. A resumed run keeps the lines of the steps it does not redo and drops
those it will run again, so the file always holds each step once.

Load it with pandas::

    df = pandas.read_json("runs/a/steps-rank0.jsonl", lines=True)
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

from ddp_fnn.core import fileio
from ddp_fnn.observe import StepRecord


class JsonLines:
    """A buffered JSON-lines file of per-step objects (each with a ``step`` key); see the
    module's docstring for buffering and resume."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._buffer: list[str] = []
        kept = _lines_up_to(self.path, start_step) if start_step > 0 else []
        fileio.atomic_write(self.path, "".join(kept))

    def add_line(self, obj: dict) -> None:
        self._buffer.append(json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if not self._buffer:
            return
        with open(self.path, "a") as f:
            f.write("".join(self._buffer))
        self._buffer = []

    def close(self) -> None:
        self.flush()


class StepFile(JsonLines):
    """``steps-rank{R}.jsonl``: one ``StepRecord.to_json()`` a line."""

    def add(self, rec: StepRecord) -> None:
        self.add_line(rec.to_json())


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The existing file's lines for steps 1..step (a resumed run redoes the rest)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            break           # a line cut short by a killed worker: nothing after it is whole
    return kept


def read(path: Path) -> list[dict]:
    """Every line of a step file, parsed strictly (NaN or Infinity are refused)."""
    def no_constants(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=no_constants) for line in Path(path).read_text().splitlines()]


def steps_ahead(lines: list[dict]) -> list[int]:
    """For each step of one rank's step file, how many earlier steps its device had not
    finished when the host began queueing it (``queued_s`` against each earlier step's
    ``start_s + step_s``): 0 on a host that waits for its device every step, about the
    steps queued since the last wait on a host that runs ahead (CUDA). The ends increase
    with the step (one device stream), so the earlier steps past ``queued_s`` are a tail."""
    ends, out = [], []
    for d in lines:
        out.append(len(ends) - bisect.bisect_right(ends, d["queued_s"]) if d.get("queued_s") is not None else 0)
        ends.append(d["start_s"] + d["step_s"])
    return out
