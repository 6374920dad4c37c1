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
straggler shows. algbw = S / time, busbw = algbw * 2(N-1)/N (wire.algbw, wire.busbw).

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

from ddp_fnn import dist as ddist
from ddp_fnn.perfmodel import netmodel, probe
from ddp_fnn.core import fileio, units, wire
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
COMPARE_BARE_DEFAULT = 8 * units.MIB

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
# ddp_fnn.dist brings the group up: torchrun's environment, or a group of one in an
# in-process store outside torchrun (no port is opened).
_World = probe.World


def _bring_up(backend: str, timeout_s: float) -> _World:
    return ddist.setup(backend, "auto", timeout_s)


def _tear_down() -> None:
    ddist.teardown()


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

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
    probe.barrier(world)
    for _ in range(warmup):
        dist.all_reduce(tensor)
    probe.barrier(world)
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
        a = wire.algbw(s, t)
        b = wire.busbw(a, n)
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
            f"alpha = {fit.alpha_s * 1e6:.1f} us, beta = {units.format_rate(fit.beta_bytes_per_second)} busbw, "
            f"rms error {fit.rms_error_s * 1e6:.1f} us ({fit.rms_relative_error:.1%} rms, "
            f"{fit.max_relative_error:.1%} max), R^2 {fit.r2:.4f}")
    elif n < 2:
        out("# world size 1: nothing crosses the network, so there is no alpha-beta fit")

    compare = None
    if cfg.compare_bare:
        compare = _compare_bare(world, cfg.compare_bare, dtype, warmup, cfg.compare_rounds)
        what = "busbw" if n >= 2 else "algbw"
        h_bw, b_bw = (compare["harness_busbw_bytes_per_second"], compare["bare_busbw_bytes_per_second"]) if n >= 2 \
            else (wire.algbw(cfg.compare_bare, compare["harness_time_s"]),
                  wire.algbw(cfg.compare_bare, compare["bare_time_s"]))
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
        fileio.write_json(cfg.json_path, report, indent=2)
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
        "harness_busbw_bytes_per_second": wire.busbw(wire.algbw(nbytes, h), n),
        "bare_busbw_bytes_per_second": wire.busbw(wire.algbw(nbytes, b), n),
        # harness busbw / bare busbw; 1.0: timing each call changes nothing.
        "ratio": b / h,
        "harness_median_s": h_median,
        "ratio_harness_median": b / h_median,
    }


def main(cfg: BenchConfig) -> int:
    run(cfg)
    return 0
