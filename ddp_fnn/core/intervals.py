"""Interval arithmetic: unions of [start, end] spans (the comm time of overlapping
collectives, a device's busy time) and the A:B step ranges of --timeline and --profile."""

from __future__ import annotations


def union_length(intervals) -> float:
    """Length of the union of [start, end] intervals. Example (docs/metrics.md): [0.125,
    0.375], [0.25, 0.5] and [0.625, 0.75] give 0.5, not the 0.625 their durations sum to."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def union_after(intervals, t: float) -> float:
    """Length of the part of the intervals' union that lies after ``t``."""
    return union_length([(max(a, t), b) for a, b in intervals if b > t])


def parse_range(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), 1-based optimizer steps, both included; ValueError with the reason."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise ValueError("expected A:B, e.g. 5:8")
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError("A and B must be integers, e.g. 5:8") from None
    if a < 1 or b < a:
        raise ValueError("needs 1 <= A <= B")
    return a, b
