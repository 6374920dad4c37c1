"""`ddp-fnn bench`: all-reduce over a sweep of message sizes, nccl-tests style, and the
alpha-beta line fitted to it (what `ddp-fnn estimate --bench-json` reads).

    One process (world size 1, no network):  ddp-fnn bench
    N processes on one host:                 torchrun --standalone --nproc-per-node N -m ddp_fnn bench --json bench.json
    Several nodes:                           torchrun --nnodes ... -m ddp_fnn bench (as launch/node.sh)

Per size S (bytes per rank): a barrier, ``warmup`` all-reduces, a barrier, then ``iters``
timed all-reduces (sum) of one tensor of S bytes. On CPU each one is timed with the wall
clock around the call, which returns only when Gloo has finished the work; on CUDA with a
pair of CUDA events per call, read after the size's last call. Each rank keeps the
median of its iterations; the reported time is the mean of the ranks' medians (nccl-tests
averages over ranks) with the slowest and fastest rank's median beside it, so a
straggler shows. algbw = S / time, busbw = algbw * 2(N-1)/N (netmodel.algbw, netmodel.busbw).

Defaults scaled for the hardware: with NCCL (GPUs) the sweep is 4 KiB .. 256 MiB doubling,
20 iterations after 5 warm-up; with Gloo (CPU) it is 4 KiB .. 32 MiB, 10 iterations after
2 warm-up, so that two processes on a 2-core machine finish in well under a minute.

After the sweep, unless ``--compare-bare 0``, the harness checks itself: at one size
(default 8 MiB) it alternates 5 calls timed one by one, as the sweep times them, with a
bare loop -- 5 back-to-back ``dist.all_reduce`` calls timed as a whole, nothing else --
for ``--compare-rounds`` rounds (default 60), and reports harness busbw / bare busbw.
Alternating in short blocks puts both under the same load on a noisy machine.

Rank 0 prints the table and writes the JSON. Its keys ``world_size``, ``backend``,
``results[].bytes``, ``results[].time_s``, ``results[].algbw_bytes_per_second``,
``results[].busbw_bytes_per_second``, ``alpha_s`` and ``beta_bytes_per_second`` are a
contract (estimate reads them).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_fnn.train import dist as ddist
from ddp_fnn.perfmodel import netmodel
from ddp_fnn import fileio
from ddp_fnn.observe import Clock, Stopwatch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# nccl-tests' names for the type column.
_TYPE_NAMES = {"float32": "float", "float16": "half", "bfloat16": "bfloat16", "float64": "double"}

DEFAULTS = {
    # backend: (sizes, iters, warmup)
    "nccl": ("4K:256M", 20, 5),
    "gloo": ("4K:32M", 10, 2),
}
COMPARE_BARE_DEFAULT = 8 * netmodel.MIB

_SIZE_RE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '8M' -> 8388608, '512' -> 512 (K, M, G are binary: KiB, MiB, GiB)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"bad size {text!r}: expected bytes like 4096, 4K, 8M or 1G")
    return int(m.group(1)) * _SCALE[m.group(2).lower()]


def parse_sizes(text: str) -> tuple[int, ...]:
    """Sizes in bytes: ``LO:HI`` doubling from LO up to HI, ``LO:HI:FACTOR``, or a list
    ``4K,1M,8M``. Raises ValueError naming the bad part."""
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"bad size range {text!r}: expected LO:HI or LO:HI:FACTOR, like 4K:64M")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        try:
            factor = int(parts[2]) if len(parts) == 3 else 2
        except ValueError:
            raise ValueError(f"bad size range {text!r}: FACTOR must be an integer >= 2") from None
        if factor < 2:
            raise ValueError(f"bad size range {text!r}: FACTOR must be an integer >= 2")
        if lo < 1 or hi < lo:
            raise ValueError(f"bad size range {text!r}: need 1 <= LO <= HI")
        sizes = []
        s = lo
        while s <= hi:
            sizes.append(s)
            s *= factor
        return tuple(sizes)
    sizes = tuple(parse_size(p) for p in text.split(","))
    if any(s < 1 for s in sizes):
        raise ValueError(f"bad sizes {text!r}: sizes must be >= 1 byte")
    return sizes


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    sizes: str | None = None
    """Sizes spec (parse_sizes); None = the backend's default."""
    iters: int | None = None
    """Timed all-reduces per size; None = the backend's default."""
    warmup: int | None = None
    """Untimed all-reduces before each size's timed ones; None = the backend's default."""
    dtype: str = "float32"
    backend: str = "auto"
    json_path: Path | None = None
    compare_bare: int = COMPARE_BARE_DEFAULT
    """Size in bytes of the harness-versus-bare check; 0 skips it."""
    compare_rounds: int = 60
    timeout_s: float = 300.0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"--backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {self.iters}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.compare_bare < 0:
            raise ValueError(f"--compare-bare must be >= 0 bytes, got {self.compare_bare}")
        if self.compare_rounds < 1:
            raise ValueError(f"--compare-rounds must be >= 1, got {self.compare_rounds}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, got {self.timeout_s}")
        if self.sizes is not None:
            parse_sizes(self.sizes)  # fail before any process group is made

    def element_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()


# ---------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------
# ddp_fnn.train.dist brings the group up: torchrun's environment, or a group of one in an
# in-process store outside torchrun (no port is opened).
_World = ddist.DistContext


def _bring_up(backend: str, timeout_s: float) -> _World:
    return ddist.setup(backend, "auto", timeout_s)


def _tear_down() -> None:
    ddist.teardown()


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

def _barrier(world: _World) -> None:
    if world.device.type == "cuda":
        dist.barrier(device_ids=[world.device.index])
    else:
        dist.barrier()


def _timed_iters(tensor: torch.Tensor, iters: int) -> list[float]:
    """Seconds of each of ``iters`` all-reduces of ``tensor``, one at a time."""
    clock = Clock(tensor.device)
    marks = []
    for _ in range(iters):
        start = clock.mark()
        dist.all_reduce(tensor)  # Gloo: returns when the reduced data is in `tensor`; CUDA: events
        marks.append((start, clock.mark()))
    return [clock.seconds(start, end) for start, end in marks]


def _bare_loop(tensor: torch.Tensor, iters: int) -> float:
    """Mean seconds per all-reduce of ``iters`` back-to-back calls timed as a whole: the
    loop anyone would write, with nothing of the harness in it."""
    if tensor.is_cuda:
        torch.cuda.synchronize()
    watch = Stopwatch()
    for _ in range(iters):
        dist.all_reduce(tensor)
    if tensor.is_cuda:
        torch.cuda.synchronize()
    return watch.seconds() / iters


def _warm_tensor(world: _World, nbytes: int, dtype: torch.dtype, warmup: int) -> torch.Tensor:
    """A tensor of ``nbytes`` after ``warmup`` all-reduces, every rank past a barrier."""
    elt = torch.empty((), dtype=dtype).element_size()
    # Zeros: repeated sums stay finite and never go subnormal (which is slow on CPUs).
    tensor = torch.zeros(nbytes // elt, dtype=dtype, device=world.device)
    _barrier(world)
    for _ in range(warmup):
        dist.all_reduce(tensor)
    _barrier(world)
    return tensor


def _measure_size(world: _World, nbytes: int, dtype: torch.dtype, iters: int, warmup: int) -> float:
    """This rank's median seconds for an all-reduce of ``nbytes``."""
    return statistics.median(_timed_iters(_warm_tensor(world, nbytes, dtype, warmup), iters))


def _across_ranks(world: _World, value: float) -> list[float]:
    """Every rank's ``value``, on every rank."""
    out: list = [None] * world.world_size
    dist.all_gather_object(out, value)
    return [float(v) for v in out]


class _Printer:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, line: str = "") -> None:
        if self.enabled:
            print(line, flush=True)


# ---------------------------------------------------------------------------------------
# the quick probe `ddp-fnn train` runs before training, for its prediction
# ---------------------------------------------------------------------------------------

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


def probe(world: _World, largest_bytes: int, points: int = 5, rounds: int = PROBE_ROUNDS,
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
               "wire_bytes": netmodel.ring_wire_bytes(payload, n)}
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


def _interleaved_times(world: _World, sizes: list[int], rounds: int, warmup: int) -> list[float]:
    """Per size: the mean over ranks of each rank's interquartile mean of ``rounds`` timed
    all-reduces, one of every size per round, after ``warmup`` untimed rounds."""
    tensors = [torch.zeros(s // 4, dtype=torch.float32, device=world.device) for s in sizes]
    _barrier(world)
    for _ in range(warmup):
        for t in tensors:
            dist.all_reduce(t)
    _barrier(world)
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
    factor = netmodel.busbw_factor(n)
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


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

def run(cfg: BenchConfig) -> dict:
    """Run the sweep in this process's group; every rank returns the same report dict."""
    wall = Stopwatch()
    world = _bring_up(cfg.backend, cfg.timeout_s)
    try:
        return _run(cfg, world, wall)
    finally:
        _tear_down()


def _run(cfg: BenchConfig, world: _World, wall: Stopwatch) -> dict:
    default_sizes, default_iters, default_warmup = DEFAULTS[world.backend]
    sizes = parse_sizes(cfg.sizes if cfg.sizes is not None else default_sizes)
    iters = cfg.iters if cfg.iters is not None else default_iters
    warmup = cfg.warmup if cfg.warmup is not None else default_warmup
    dtype = DTYPES[cfg.dtype]
    elt = cfg.element_size()
    for s in sizes + ((cfg.compare_bare,) if cfg.compare_bare else ()):
        if s % elt:
            raise ValueError(f"size {s} B is not a whole number of {cfg.dtype} elements ({elt} B each)")
    n = world.world_size
    out = _Printer(world.rank == 0)

    out(f"# ddp-fnn bench: all_reduce (sum), world size {n}, backend {world.backend}, device {world.device}, "
        f"{cfg.dtype}, {iters} iters after {warmup} warm-up per size")
    out("# time: mean over ranks of each rank's median; min/max: fastest and slowest rank's median")
    out("#")
    out(f"# {'size':>11} {'count':>11} {'type':>8} {'time':>10} {'min':>10} {'max':>10} {'algbw':>8} {'busbw':>8}")
    out(f"# {'(B)':>11} {'(elements)':>11} {'':>8} {'(us)':>10} {'(us)':>10} {'(us)':>10} {'(GB/s)':>8} "
        f"{'(GB/s)':>8}")
    results = []
    for s in sizes:
        per_rank = _across_ranks(world, _measure_size(world, s, dtype, iters, warmup))
        t = statistics.fmean(per_rank)
        a = netmodel.algbw(s, t)
        b = netmodel.busbw(a, n)
        results.append({"bytes": s, "count": s // elt, "dtype": cfg.dtype, "time_s": t,
                        "time_min_s": min(per_rank), "time_max_s": max(per_rank),
                        "algbw_bytes_per_second": a, "busbw_bytes_per_second": b, "iters": iters})
        out(f"  {s:>11} {s // elt:>11} {_TYPE_NAMES[cfg.dtype]:>8} {t * 1e6:>10.1f} {min(per_rank) * 1e6:>10.1f} "
            f"{max(per_rank) * 1e6:>10.1f} {a / 1e9:>8.3f} {b / 1e9:>8.3f}")

    fit = None
    if n >= 2 and len(sizes) >= 2:
        try:
            fit = netmodel.fit_alpha_beta([r["bytes"] for r in results], [r["time_s"] for r in results], n)
        except ValueError as e:
            out(f"# no alpha-beta fit: {e}")
    if fit is not None:
        out(f"# fit t(S) = alpha + S*2(N-1)/N / beta (least squares on relative error): "
            f"alpha = {fit.alpha_s * 1e6:.1f} us, beta = {netmodel.format_rate(fit.beta_bytes_per_second)} busbw, "
            f"rms error {fit.rms_error_s * 1e6:.1f} us ({fit.rms_relative_error:.1%} rms, "
            f"{fit.max_relative_error:.1%} max), R^2 {fit.r2:.4f}")
    elif n < 2:
        out("# world size 1: nothing crosses the network, so there is no alpha-beta fit")

    compare = None
    if cfg.compare_bare:
        compare = _compare_bare(world, cfg.compare_bare, dtype, warmup, cfg.compare_rounds)
        what = "busbw" if n >= 2 else "algbw"
        h_bw, b_bw = (compare["harness_busbw_bytes_per_second"], compare["bare_busbw_bytes_per_second"]) if n >= 2 \
            else (netmodel.algbw(cfg.compare_bare, compare["harness_time_s"]),
                  netmodel.algbw(cfg.compare_bare, compare["bare_time_s"]))
        out(f"# harness vs bare all_reduce loop at {cfg.compare_bare} B, {cfg.compare_rounds} alternating rounds "
            f"of {COMPARE_BLOCK} + {COMPARE_BLOCK} calls: mean {what} {h_bw / 1e9:.3f} vs {b_bw / 1e9:.3f} GB/s, ratio {compare['ratio']:.3f} "
            f"(harness median time {compare['harness_median_s'] * 1e6:.1f} us, mean "
            f"{compare['harness_time_s'] * 1e6:.1f} us, bare mean {compare['bare_time_s'] * 1e6:.1f} us)")

    report = {
        "world_size": n,
        "backend": world.backend,
        "device": str(world.device),
        "dtype": cfg.dtype,
        "op": "all_reduce(sum)",
        "iters": iters,
        "warmup": warmup,
        "torch_version": torch.__version__,
        "results": results,
        "alpha_s": fit.alpha_s if fit else None,
        "beta_bytes_per_second": fit.beta_bytes_per_second if fit else None,
        "fit": fit.to_dict() if fit else None,
        "compare_bare": compare,
        "wall_time_s": wall.seconds(),
    }
    if world.rank == 0 and cfg.json_path is not None:
        cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
        cfg.json_path.write_text(fileio.dumps(report, indent=2) + "\n")
        out(f"# wrote {cfg.json_path}")
    return report


COMPARE_BLOCK = 5
"""Calls per side per round of the harness-versus-bare check: short blocks alternate often,
so a burst of load from other processes falls on both sides alike."""


def _compare_bare(world: _World, nbytes: int, dtype: torch.dtype, warmup: int, rounds: int) -> dict:
    """The harness's timing against a bare loop on one tensor, alternated ``rounds`` times.

    Per round: ``COMPARE_BLOCK`` calls timed one by one by the sweep's own code
    (``_timed_iters``), then ``COMPARE_BLOCK`` back-to-back calls timed as a whole
    (``_bare_loop``); one barrier before the first round, none between (every all-reduce
    keeps the ranks in step). Both sides are compared by their mean time per call over
    all rounds: the same statistic on interleaved samples, so the ratio shows only what
    timing each call does to the work. The sweep's own statistic, the median of per-call
    times, is reported beside it (``harness_median_s``): on a loaded machine per-call
    times are skewed to the right and the median sits below the mean. Figures are
    averaged over ranks.
    """
    tensor = _warm_tensor(world, nbytes, dtype, warmup)
    harness: list[float] = []
    bare: list[float] = []
    for _ in range(rounds):
        harness.extend(_timed_iters(tensor, COMPARE_BLOCK))
        bare.append(_bare_loop(tensor, COMPARE_BLOCK))
    h = statistics.fmean(_across_ranks(world, statistics.fmean(harness)))
    b = statistics.fmean(_across_ranks(world, statistics.fmean(bare)))
    h_median = statistics.fmean(_across_ranks(world, statistics.median(harness)))
    n = world.world_size
    return {
        "bytes": nbytes,
        "rounds": rounds,
        "calls_per_round": COMPARE_BLOCK,
        "harness_time_s": h,
        "bare_time_s": b,
        "harness_busbw_bytes_per_second": netmodel.busbw(netmodel.algbw(nbytes, h), n),
        "bare_busbw_bytes_per_second": netmodel.busbw(netmodel.algbw(nbytes, b), n),
        # harness busbw / bare busbw; 1.0: timing each call changes nothing.
        "ratio": b / h,
        "harness_median_s": h_median,
        "ratio_harness_median": b / h_median,
    }


def main(cfg: BenchConfig) -> int:
    run(cfg)
    return 0
