"""Network or straggler? Real torchrun jobs with an injected straggler (--slow-rank 1
--slow-ms 20) at 2 and 4 ranks: the others' exposed communication becomes waiting for
rank 1, rank 1 is named the last one ready, and the transfer stays what it is without
the straggler. With one rank's clock shifted by seconds (DDP_FNN_CLOCK_SHIFT), the
measured offset recovers the shift and the split still holds."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import torchrun
from ddp_fnn.observe import stepfile

pytestmark = pytest.mark.slow

SLOW_MS = 20.0
WARMUP = 3
# Compute of about 10 ms and 4 rows a rank, so the injected 20 ms dominates the difference
# between ranks. One bucket (8.8 MB): nothing is on the wire before a rank is ready, so
# the transfer after the last ready is the whole all-reduce with or without a straggler,
# and at ~20 ms it is long against this 2-core machine's scheduling jitter (with 2.2 MB,
# 4 ranks on 2 cores moved it by 20 % between runs).
# (With several buckets, how much of the earlier buckets' traffic is still queued at the
# last ready depends on the schedule, and so does the transfer: see docs/metrics.md.)
RUN = ("--layers", "64,1024,1024,1024,10", "--samples", "4096", "--max-steps", "60",
       "--metrics-port", "0", "--progress", "none", "--no-probe", "--log-every", "8")


def launch(tmp_path, nproc: int, *extra: str, env: dict | None = None):
    out = tmp_path / f"n{nproc}-{'-'.join(extra) or 'clean'}-{len(env or {})}"
    r = torchrun(nproc, "train", *RUN, "--global-batch-size", str(4 * nproc), "--output", str(out), *extra,
                 env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {rank: stepfile.read(out / f"steps-rank{rank}.jsonl")[WARMUP:] for rank in range(nproc)}
    return summary, steps


def mean(lines, key):
    return statistics.fmean(d[key] for d in lines)


@pytest.fixture(scope="module", params=[2, 4])
def runs(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"peers{n}")
    clean = launch(tmp, n)
    slow = launch(tmp, n, "--slow-rank", "1", "--slow-ms", f"{SLOW_MS:g}")
    # The clock of a rank that is not the straggler at 4 ranks; of the straggler itself at 2.
    shifted_rank = 1 if n == 2 else 2
    shifted = launch(tmp, n, "--slow-rank", "1", "--slow-ms", f"{SLOW_MS:g}",
                     env={"DDP_FNN_CLOCK_SHIFT": f"{shifted_rank}:3.25"})
    return n, clean, slow, (shifted_rank, shifted)


def compute(lines) -> float:
    """Mean compute per step, from the rank's own phases alone (no other rank's clock)."""
    return statistics.fmean(d["data_s"] + d["forward_s"] + d["backward_s"] for d in lines)


def start_lag(summary, steps, r) -> float:
    """Mean of how much later rank 1 starts a step than rank ``r``, from each rank's own
    step starts moved into rank 0's time base by its measured clock offset."""
    offset = [(c["offset_start_s"] + c["offset_end_s"]) / 2 for c in summary["clock_offsets"]]
    return statistics.fmean((a["start_s"] - offset[1]) - (b["start_s"] - offset[r])
                            for a, b in zip(steps[1], steps[r], strict=True))


def check_split(n, slow, clean):
    summary, steps = slow
    _, clean_steps = clean
    own1 = compute(steps[1]) - SLOW_MS / 1e3          # rank 1's compute without the injection
    for r in range(n):
        if r == 1:
            continue
        # Every other rank waits for rank 1: the injected 20 ms plus rank 1's own compute
        # minus this rank's (either sign), plus how much later rank 1 also *starts* its
        # steps (it finishes the previous one last). That lag is ~0 at 2 ranks and 0-4 ms
        # at 4 ranks on 2 cores, where it alone once put the wait 21 % above the first two
        # terms; with it the wait has matched within 2 % (docs/metrics.md).
        expected = SLOW_MS / 1e3 + own1 - compute(steps[r])
        lag = start_lag(summary, steps, r)
        wait = mean(steps[r], "wait_s")
        print(f"n={n} rank {r}: wait {wait * 1e3:.2f} ms, expected {expected * 1e3:.2f} ms "
              f"(20 ms + compute difference {(expected - SLOW_MS / 1e3) * 1e3:+.2f} ms) "
              f"+ start lag {lag * 1e3:.2f} ms")
        assert wait == pytest.approx(expected + lag, rel=0.10)
        # ... and most of it is the straggler's injected delay, not the lag
        assert -0.1 * SLOW_MS / 1e3 <= lag <= 0.5 * SLOW_MS / 1e3, lag
        assert wait >= 0.8 * expected
        assert mean(steps[1], "wait_s") < 0.10 * expected
    last = [d["last_ready_rank"] for d in steps[0]]
    assert sum(1 for v in last if v == 1) >= 0.9 * len(last)
    assert summary["ranks"][1]["last_ready_share"] >= 0.9
    # The network's part is what it was without the straggler. (Medians over steps: this
    # 2-core machine's scheduling makes single steps jump.) benchmarks/straggler.py, which
    # alternates clean and straggler runs over 5 rounds and waits for a quiet machine,
    # finds the median ratio 0.92-0.93 at 2 ranks and 0.93-0.97 at 4 (docs/metrics.md):
    # Gloo starts sending as soon as a rank calls the all-reduce, so an early rank's first
    # chunk is already in the late one's socket buffer when it gets there. A single pair
    # of runs, which is all this test has, moves by 0.79..1.25 between rounds even on a
    # quiet machine, and at 2 ranks the transfer is ~10 ms, where waking the rank that
    # slept costs a scheduler tick or two (one suite run: 11.8 against 8.7 ms). So the
    # margin here is 30 % + 3 ms: a guard against a broken split (wait counted as
    # transfer would add the straggler's 20 ms); the 20 % claim is the benchmark's.
    # Below, the guard is a factor of 3: one suite run's clean baseline took 14.1 ms
    # against the straggler run's 6.4 ms (the clean run was the slow one), and transfer
    # counted as wait, the opposite break, would leave next to nothing here and fails
    # the wait check above as well.
    for r in range(n):
        t = statistics.median(d["transfer_s"] for d in steps[r])
        t0 = statistics.median(d["transfer_s"] for d in clean_steps[r])
        print(f"n={n} rank {r}: transfer {t * 1e3:.2f} ms with the straggler, {t0 * 1e3:.2f} ms without")
        assert t - t0 <= 0.30 * t0 + 0.003, (t, t0)
        assert t >= t0 / 3, (t, t0)


def test_a_slow_rank_makes_the_others_wait_and_is_named(runs):
    n, clean, slow, _ = runs
    check_split(n, slow, clean)


def test_a_shifted_clock_is_measured_and_the_split_still_holds(runs):
    n, clean, _, (shifted_rank, shifted) = runs
    summary = shifted[0]
    for r, c in enumerate(summary["clock_offsets"]):
        true = 3.25 if r == shifted_rank else 0.0
        for when in ("start", "end"):
            assert abs(c[f"offset_{when}_s"] - true) < 1e-3, (r, c)
            # on one host the rest of the offset is 0: within the bound the estimate gives
            assert abs(c[f"offset_{when}_s"] - true) <= c[f"bound_{when}_s"] + 1e-6, (r, c)
    check_split(n, shifted, clean)


def test_on_one_host_the_offsets_are_zero_within_their_bounds(runs):
    _, (summary, _), _, _ = runs
    for c in summary["clock_offsets"]:
        assert abs(c["offset_start_s"]) <= c["bound_start_s"] + 1e-6
        assert abs(c["offset_end_s"]) <= c["bound_end_s"] + 1e-6
        assert c["bound_start_s"] < 1e-3


AHEAD_S = 0.02


def test_a_host_that_runs_ahead_still_gets_wait_and_transfer_right(runs, tmp_path):
    """The CUDA hazard, emulated on Gloo: rank 1's host takes each step's queue time 20 ms
    before its work starts (DDP_FNN_RUN_AHEAD), as a host that runs ahead of its GPU
    does. A ready time built from the queue time would put rank 1 ready 20 ms early and
    hide half of the straggle; on one clock (the marks' own, observe/clock.py) rank 0
    waits for all of it: the injected 20 ms in forward, the 20 ms before the step, and
    rank 1's own compute less rank 0's (each from that rank's own phases)."""
    n, clean, _, _ = runs
    if n != 2:
        pytest.skip("one world size is enough for the clock rule")
    summary, steps = launch(tmp_path, 2, "--slow-rank", "1", "--slow-ms", f"{SLOW_MS:g}",
                            env={"DDP_FNN_RUN_AHEAD": f"1:{AHEAD_S}"})
    injected = SLOW_MS / 1e3 + AHEAD_S
    expected = injected + (compute(steps[1]) - SLOW_MS / 1e3) - compute(steps[0])
    wait = mean(steps[0], "wait_s")
    lag = start_lag(summary, steps, 0)
    print(f"rank 0 waits {wait * 1e3:.2f} ms; injected {injected * 1e3:.0f} ms, expected {expected * 1e3:.2f} ms; "
          f"rank 1 starts {lag * 1e3:.2f} ms later")
    assert wait == pytest.approx(expected, rel=0.10)
    assert lag == pytest.approx(AHEAD_S, abs=0.25 * AHEAD_S)   # its steps start when its work does
    assert mean(steps[1], "wait_s") < 0.10 * expected
    for r in range(2):   # the network's part is what it is without the straggler (check_split's guard)
        t = statistics.median(d["transfer_s"] for d in steps[r])
        t0 = statistics.median(d["transfer_s"] for d in clean[1][r])
        assert t - t0 <= 0.30 * t0 + 0.003 and t >= t0 / 3, (r, t, t0)
