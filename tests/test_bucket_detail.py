"""--bucket-detail-every K: bucket detail every K steps, DDP's C++ path between.

The claims: the steps between compute the same bits (a second, stock DDP wrapper over the
same module, train/sync.py); their records carry exact step totals from the Reducer's own
ready times (an injected straggler is still measured as the wait it is); the records say
which steps are detailed, and the figures that need completions come from those only.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from conftest import run_cli, torchrun
from ddp_fnn.observe import stepfile
from ddp_fnn.observe.records import CollectiveRecord, make_record

# 24 hidden layers and 0.25 MiB buckets: many buckets a step, as in benchmarks/throughput.py.
DEEP = ("--layers", "32," + ",".join(["256"] * 12) + ",4", "--bucket-mb", "0.25", "--samples", "2048",
        "--metrics-port", "0", "--progress", "none", "--no-probe", "--log-every", "4")


def train(tmp_path, name: str, nproc: int, *extra: str):
    out = tmp_path / name
    r = torchrun(nproc, "train", *DEEP, "--output", str(out), *extra, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = {rank: stepfile.read(out / f"steps-rank{rank}.jsonl") for rank in range(nproc)}
    return out, json.loads((out / "summary.json").read_text()), steps


@pytest.mark.slow
@pytest.mark.parametrize("world", [3, 2])
def test_sampled_detail_trains_bit_for_bit_as_every_step_detailed(tmp_path, world):
    """13 steps with detail every 4 steps end on the same bits as with every step
    detailed; steps 1, 5, 9, 13 are the detailed ones and the others carry hand-overs
    without completions. World size 3: not a power of two, where the averaging's rounding
    shows and the hook multiplies each bucket by 1/3 as the Reducer does. World size 2:
    the loss carries the 1/2 on the detailed steps (Synchroniser.loss_scale) and the hook
    adds unscaled buckets; exact, so the same bits as the Reducer's own halving."""
    every, _, every_steps = train(tmp_path, "k1", world, "--global-batch-size", "48", "--max-steps", "13")
    sampled, summary, steps = train(tmp_path, "k4", world, "--global-batch-size", "48", "--max-steps", "13",
                                    "--bucket-detail-every", "4")
    a = torch.load(every / "model.pt", weights_only=True)
    b = torch.load(sampled / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rank in range(world):
        lines = steps[rank]
        assert [d["step"] for d in lines if d["detailed"]] == [1, 5, 9, 13]
        assert all(d["detailed"] for d in every_steps[rank])
        for d in lines[2:]:
            # The same buckets and bytes on every step, detailed or not (DDP's rebuilt layout).
            assert d["payload_bytes"] == lines[-1]["payload_bytes"] and len(d["collectives"]) > 5
            if not d["detailed"]:
                assert all(c["end_s"] is None and c["exposed_s"] is None for c in d["collectives"])
                assert d["tail_s"] == 0.0
                starts = [c["start_s"] for c in d["collectives"]]
                assert starts == sorted(starts)                     # DDP launches in order
                assert d["ready_s"] == starts[-1]
                assert d["sync_start_s"] <= d["sync_end_s"] <= d["step_s"]
                assert d["exposed_s"] == pytest.approx(d["sync_end_s"] - d["sync_start_s"])
    assert summary["detailed_steps"] == 4
    assert summary["allreduce_payload_bytes_total"] == sum(d["payload_bytes"] for d in steps[0])


@pytest.mark.slow
def test_a_straggler_is_measured_alike_on_steps_with_and_without_detail(tmp_path):
    """Rank 1 idles 20 ms in every forward (--slow-rank): rank 0's wait, from the ready
    times the C++ path's Reducer reports, is the injected straggle on the steps without
    detail as on the detailed ones (within 10 % of the expected wait, computed as in
    tests/test_launch_peers.py from each rank's own phases)."""
    slow_s = 0.020
    _, summary, steps = train(tmp_path, "slow", 2, "--global-batch-size", "8", "--max-steps", "41",
                              "--bucket-detail-every", "5", "--slow-rank", "1", "--slow-ms", "20")

    def compute(lines):
        return statistics.fmean(d["forward_s"] + d["backward_s"] + d["data_s"] for d in lines)

    for detailed in (True, False):
        mine = [d for d in steps[0][3:] if d["detailed"] is detailed]
        theirs = [d for d in steps[1][3:] if d["detailed"] is detailed]
        assert len(mine) >= 5
        expected = slow_s + (compute(theirs) - slow_s) - compute(mine)
        wait = statistics.median(d["wait_s"] for d in mine)
        print(f"detailed={detailed}: rank 0 waits {wait * 1e3:.2f} ms, expected {expected * 1e3:.2f} ms")
        assert wait == pytest.approx(expected, rel=0.10)
        assert statistics.median(d["wait_s"] for d in theirs) < 0.1 * expected
        assert all(d["last_ready_rank"] == 1 for d in mine)
    assert summary["last_ready_share"] < 0.1          # rank 0's own share: it is never the last


def test_a_step_without_detail_has_totals_from_its_hand_overs():
    """make_record on a C++-path step, by hand: buckets handed over at 20, 25 and 30 ms,
    backward returned at 45 ms; comm runs 20..45 ms, ready is 30 ms, and the 15 ms after
    it are all exposed (no completions, so no tail apart from it)."""
    nan = math.nan
    colls = [CollectiveRecord(b, 1000, 1, t, nan, nan) for b, t in enumerate((0.020, 0.025, 0.030))]
    intervals = [("data", 0.0, 0.001), ("forward", 0.001, 0.010), ("backward", 0.010, 0.045),
                 ("sync", 0.045, 0.0451), ("optimizer", 0.0451, 0.050)]
    rec = make_record(7, 8, 0.0, 100.0, 0.050, intervals, colls, detailed=False)
    assert rec.ready_s == 0.030 and rec.sync_start_s == 0.030
    assert rec.sync_end_s == pytest.approx(0.0451)
    assert rec.comm_s == pytest.approx(0.0251) and rec.comm_span_s == rec.comm_s
    assert rec.exposed_s == pytest.approx(0.0151) and rec.tail_s == 0.0
    assert rec.phases["backward"] == pytest.approx(0.020)          # compute: until the last hand-over
    assert rec.payload_bytes == 3000 and rec.calls == 3
    line = rec.to_json()
    assert line["detailed"] is False and line["collectives"][0]["end_s"] is None
    json.dumps(line, allow_nan=False)                                # strict JSON


@pytest.mark.parametrize("args, message", [
    (["--bucket-detail-every", "0"], "--bucket-detail-every must be >= 1, got 0"),
    (["--bucket-detail-every", "4", "--ddp-logger", "--output", "OUT"],
     "--ddp-logger needs --bucket-detail-every 1 (its witness reads every step), got 4"),
])
def test_bad_detail_settings_are_one_line_and_exit_2(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = run_cli("train", "--max-steps", "1", "--metrics-port", "0", *args)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"ddp-fnn: error: {message}"], r.stderr
