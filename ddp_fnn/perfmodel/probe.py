"""The quick probe `ddp-fnn train` runs before training, for its prediction
(predict.network): a short ladder of fp32 all-reduces, interleaved over rounds, and the
alpha-beta line fitted to it, in the group the job has already joined.

`ddp-fnn bench` (bench.py) is the full sweep a person runs on purpose; this is the few
seconds a training job spends before its first step, and it shares only ``barrier``
with the bench. It lives apart from the bench's command so that training does not
import the bench CLI module.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from ddp_fnn.core import wire
from ddp_fnn import dist as ddist
from ddp_fnn.perfmodel import netmodel
from ddp_fnn.observe import Clock

# The group the probe runs in, as ddp_fnn.dist.setup returns it (rank, world size,
# device, backend).
World = ddist.DistContext


def barrier(world: World) -> None:
    """dist.barrier, on this rank's GPU where the group is NCCL's."""
    if world.device.type == "cuda":
        dist.barrier(device_ids=[world.device.index])
    else:
        dist.barrier()


# Below about a MiB, loopback and namespace all-reduces cost mostly latency and
# scheduling: their times barely grow with the size, and a line through them alone can
# come out flat or falling. So the probe always reaches at least this size.
PROBE_MIN_TOP_BYTES = 1 << 20
PROBE_ROUNDS = 5
"""Timed rounds; each round all-reduces every size once."""
PROBE_WARMUP_ROUNDS = 1
"""Untimed rounds before them (first-call set-up, buffers, pair connections)."""
PROBE_MIN_SPREAD = 8.0
"""The largest size must take at least this many times as long as the smallest for the
line to be trusted: then bytes, not per-call latency and scheduling noise, set its slope."""
PROBE_MIN_TOP_S = 0.01
"""... and take at least this long: scheduling on a shared host costs milliseconds a
call, so a largest size faster than that fits a line whose slope is not the bytes' even
when the spread passes (on a quiet loopback moment, 4 KiB in 0.4 ms and 1 MiB in 4 ms
gave beta 272 MB/s where 16 MiB gives about 1,000 MB/s)."""
PROBE_GROWTH = 16
"""Where the first sizes fall short of PROBE_MIN_SPREAD, the one retry's largest size is
this many times the first's ..."""
PROBE_MAX_TOP_BYTES = 64 << 20
"""... but no larger than this (or the largest bucket, if that is larger) ..."""
PROBE_RETRY_MAX_CALL_S = 0.1
"""... and no larger than one call of this many seconds at the first largest size's time
per byte (an overestimate: that time includes the latency). Where the largest size
already takes tens of milliseconds, as on a slow link with a large latency, bytes do set
the slope, and a size 16 times larger would cost seconds; where it is small, as on
loopback, it costs a few hundred milliseconds. A retry less than 4 times larger is not
made."""


def probe(world: World, largest_bytes: int, points: int = 5, rounds: int = PROBE_ROUNDS,
          warmup: int = PROBE_WARMUP_ROUNDS) -> dict:
    """Fit alpha and beta to fp32 all-reduces of ``points`` sizes, a factor 4 apart, down
    from the largest gradient bucket or 1 MiB, whichever is larger, in the group ``world``
    has joined.

    The sizes are interleaved: ``warmup`` untimed rounds, then ``rounds`` timed rounds,
    each of which all-reduces every size once, smallest first. A burst of load from other
    processes then falls on all sizes alike instead of on whichever size was being timed,
    which on a busy 2-core host made the line fall as often as rise. Each rank keeps per
    size the interquartile mean of its rounds (the mean of the middle half): one round hit
    by a burst is dropped, as a median would drop it, while the spread of the middle half
    still counts, so the figure stays nearer the mean a run reports than the median does
    (per-call times on a loaded host are skewed to the right). The size's time is the mean
    of that over ranks, and the line is fitted by plain least squares
    (``relative=False``), so that the largest sizes, not the small sizes' noise, decide it
    (docs/links.md).

    Its quality is checked: least squares must fit, and the largest size must take at
    least ``PROBE_MIN_SPREAD`` times as long as the smallest and at least
    ``PROBE_MIN_TOP_S``. On loopback 1 MiB costs
    about what 4 KiB does (both a few hundred microseconds to milliseconds of wake-ups),
    so a line through them is noise; if the check fails, the probe runs once more with
    the largest size ``PROBE_GROWTH`` times larger (at most ``PROBE_MAX_TOP_BYTES``, or
    the largest bucket, and at most what one call of ``PROBE_RETRY_MAX_CALL_S`` moves at
    the first attempt's rate) and keeps that answer. Every rank sees the same times, so every
    rank takes the same decision.

    It always answers. Where least squares still finds no growing line, it falls back,
    and ``method`` says how: ``two-point`` takes alpha from the smallest size and beta
    from the largest; ``largest`` (when even those two do not grow) takes alpha = 0 and
    beta from the largest size alone, an upper bound on the time per byte.

    Returns ``{"alpha_s", "beta_bytes_per_second", "method", "sizes", "times_s",
    "attempt_sizes", "calls_per_size", "wire_bytes", "payload_bytes", "calls", ...}``,
    the same on every rank, or ``{}`` at world size 1, where nothing crosses the network.
    ``sizes`` and ``times_s`` are the fitted points (the last attempt's);
    ``attempt_sizes`` lists every attempt's sizes, each all-reduced ``calls_per_size``
    times (warm-up and timed rounds), so ``payload_bytes = calls_per_size x the sum of
    all attempt_sizes`` exactly. ``wire_bytes`` is what the probe itself sent from this
    rank (ring formula), so a byte count can add it or leave it out. (The one all-gather
    per attempt that shares the times is not counted: a few hundred bytes.)"""
    n = world.world_size
    if n < 2:
        return {}
    top = max(PROBE_MIN_TOP_BYTES, largest_bytes - largest_bytes % 4)
    attempts: list[list[int]] = []
    while True:
        sizes = _probe_sizes(top, points)
        attempts.append(sizes)
        times = _interleaved_times(world, sizes, rounds, warmup)
        fit = fit_probe(sizes, times, n)
        bigger = probe_retry_top(top, fit["method"], times)
        if bigger is None or len(attempts) > 1:
            break
        top = bigger
    calls_per_size = rounds + warmup
    payload = calls_per_size * sum(sum(a) for a in attempts)
    traffic = {"sizes": sizes, "times_s": times, "world_size": n, "attempt_sizes": attempts,
               "rounds": rounds, "warmup_rounds": warmup, "calls_per_size": calls_per_size,
               "spread": times[-1] / times[0], "payload_bytes": payload,
               "calls": calls_per_size * sum(len(a) for a in attempts),
               "wire_bytes": wire.ring_wire_bytes(payload, n)}
    return {**fit, **traffic}


def _probe_sizes(top: int, points: int) -> list[int]:
    """``points`` sizes a factor 4 apart down from ``top``, whole fp32 elements, >= 4 KiB."""
    return sorted({max(4096, (top >> (2 * k)) - (top >> (2 * k)) % 4) for k in range(points)})


def probe_retry_top(top: int, method: str, times: list[float]) -> int | None:
    """The largest size of the probe's retry, or None when the fit passes its check (least
    squares, and the largest size at least PROBE_MIN_SPREAD times as slow as the smallest
    and at least PROBE_MIN_TOP_S long)
    or when no size at least 4 times larger is within PROBE_MAX_TOP_BYTES and
    PROBE_RETRY_MAX_CALL_S (times[-1] is the largest size's, ``top``'s, time)."""
    if method == "least-squares" and times[-1] >= max(PROBE_MIN_SPREAD * times[0], PROBE_MIN_TOP_S):
        return None
    by_time = int(top * PROBE_RETRY_MAX_CALL_S / times[-1]) if times[-1] > 0 else top * PROBE_GROWTH
    bigger = min(top * PROBE_GROWTH, max(top, PROBE_MAX_TOP_BYTES), by_time)
    bigger -= bigger % 4
    return bigger if bigger >= 4 * top else None


def _interleaved_times(world: World, sizes: list[int], rounds: int, warmup: int) -> list[float]:
    """Per size: the mean over ranks of each rank's interquartile mean of ``rounds`` timed
    all-reduces, one of every size per round, after ``warmup`` untimed rounds."""
    tensors = [torch.zeros(s // 4, dtype=torch.float32, device=world.device) for s in sizes]
    barrier(world)
    for _ in range(warmup):
        for t in tensors:
            dist.all_reduce(t)
    barrier(world)
    clock = Clock(world.device)
    marks: list[list] = [[] for _ in sizes]
    for _ in range(rounds):
        for t, m in zip(tensors, marks):
            start = clock.mark()
            dist.all_reduce(t)          # Gloo: returns when the reduced data is in `t`; CUDA: events
            m.append((start, clock.mark()))
    mine = [interquartile_mean([clock.seconds(a, b) for a, b in m]) for m in marks]
    everyone: list = [None] * world.world_size
    dist.all_gather_object(everyone, mine)
    return [statistics.fmean(float(r[i]) for r in everyone) for i in range(len(sizes))]


def interquartile_mean(values: list[float]) -> float:
    """The mean of the middle half: sorted, a quarter (rounded down) dropped at each end.
    [1, 2, 3, 4, 100] -> mean(2, 3, 4) = 3."""
    xs = sorted(values)
    k = len(xs) // 4
    return statistics.fmean(xs[k:len(xs) - k])


def fit_probe(sizes: list[int], times: list[float], n: int) -> dict:
    """alpha and beta from the probe's (size, time) points, always: least squares,
    else the two-point or the largest-size fallback (see ``probe``)."""
    factor = wire.busbw_factor(n)
    try:
        fit = netmodel.fit_alpha_beta(sizes, times, n, relative=False)
        return {"alpha_s": fit.alpha_s, "beta_bytes_per_second": fit.beta_bytes_per_second,
                "rms_relative_error": fit.rms_relative_error, "method": "least-squares"}
    except ValueError as e:               # e.g. times that do not grow with size on a noisy host
        why = str(e)
    if times[-1] > times[0]:
        beta = (sizes[-1] - sizes[0]) * factor / (times[-1] - times[0])
        alpha = max(0.0, times[0] - sizes[0] * factor / beta)
        method = "two-point"
    else:
        alpha, beta, method = 0.0, sizes[-1] * factor / times[-1], "largest"
    return {"alpha_s": alpha, "beta_bytes_per_second": beta, "rms_relative_error": None,
            "method": method, "fallback_because": why}
