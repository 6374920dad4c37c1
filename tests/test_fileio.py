"""fileio's atomic writes: afterwards a file holds all of the old content or all of the
new, never part of either, and no temporary file is left beside it."""

import math

import pytest

from ddp_fnn.core import fileio


def test_atomic_write_writes_text_and_bytes_and_leaves_only_the_file(tmp_path):
    target = tmp_path / "out.txt"
    fileio.atomic_write(target, "first\n")
    assert target.read_text() == "first\n"
    fileio.atomic_write(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_write_that_fails_midway_keeps_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "sweep.csv"
    fileio.atomic_write(target, "old\n")

    def half_then_fail(f):
        f.write(b"new, half of it")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.csv"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "point.json"
    with pytest.raises(TypeError):
        fileio.write_json(target, {"x": {1, 2}})            # a set: not JSON
    assert list(tmp_path.iterdir()) == []


def test_write_json_is_strict_json_with_null_for_non_finite_numbers(tmp_path):
    target = tmp_path / "sweep.json"
    fileio.write_json(target, {"loss": math.nan, "rate": math.inf, "n": 2, "xs": [1.5, -math.inf]}, indent=2)
    text = target.read_text()
    assert text.endswith("}\n")
    assert fileio.loads(text) == {"loss": None, "rate": None, "n": 2, "xs": [1.5, None]}
