"""Network or straggler, measured steadily: clean runs against runs with an injected
straggler (--slow-rank 1 --slow-ms 20), alternating, at 2 and 4 ranks.

docs/metrics.md ("Network or straggler") records the figures of this command:

    flock /work/notes/cpu.lock .venv/bin/python benchmarks/straggler.py --json straggler.json

Each run is a real job, `OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node N -m
ddp_fnn train ... --output DIR` (loopback, Gloo, CPU), with tests/test_launch_peers.py's
settings: layers 64,1024,1024,1024,10 (8.7 MB of gradient in one DDP bucket), 4 rows a rank
(global batch 4 x N), --no-probe, --log-every 8, 60 steps (--steps). Each round runs, for
every world size, one clean and one straggler run, the order alternating from round to
round (clean first, then straggler first, ...) so that neither always goes first.

From each run it reads summary.json (every rank's wait_for_peers_per_step_s,
transfer_per_step_s and last_ready_share: the product's own figures, means over every
step but the first) and the step files (each rank's compute, data + forward + backward,
over the same steps: summary.json has no per-rank compute; and the median transfer over
the steps after the first 3, the figure tests/test_launch_peers.py compares). Per round
it prints the transfer of every rank, clean and with the straggler, and their ratio;
each other rank's wait against what it should be, 20 ms plus rank 1's compute without
the injection minus its own; rank 1's wait and last-ready share. Then the medians over
the rounds (of the per-round figures and ratios) and whether the claims hold on them:

    (a) every other rank's wait within 20 % of 20 ms + its compute difference to rank 1
    (b) rank 1's wait under 10 % of that (of the smallest such expectation)
    (c) rank 1 last ready in >= 90 % of the steps
    (d) every rank's mean transfer within 20 % of the clean run's

The transfer is CPU work on loopback (Gloo's copies and sums, the kernel's TCP), so other
jobs on the machine lengthen it as much as they take of its CPUs, and a pair of runs of
which only one met such a job compares that job, not the straggler (measured: 2.0 and 0.67
in such pairs, 0.88-0.97 in quiet ones, docs/metrics.md). So every run records what share
of the machine's CPUs other processes took meanwhile (/proc/stat's busy time minus the
run's own CPU time), and a pair in which either run saw more than --max-others-share
(10 %) is printed, marked DISTURBED and repeated, up to --retries times; the round then
counts its least disturbed pair (still marked so). Before each pair it waits (up to
--quiet-wait seconds) for 2 s in which other jobs took no more than that share. Exit status 0 when every claim holds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ddp_fnn.core import fileio  # noqa: E402
from ddp_fnn.observe import stepfile  # noqa: E402  (the repo's package, without installing it)

SLOW_RANK = 1
SLOW_MS = 20.0
WARMUP = 3            # steps the test's medians leave out (summary.json leaves out the first)
TRAIN = ["--layers", "64,1024,1024,1024,10", "--samples", "4096", "--metrics-port", "0",
         "--progress", "none", "--no-probe", "--log-every", "8"]
WAIT_REL, RANK1_SHARE, LAST_READY, TRANSFER_REL = 0.20, 0.10, 0.90, 0.20


def torchrun_cmd() -> list[str]:
    """The repo's .venv torchrun (the interpreter the tests use), else this interpreter's."""
    venv = REPO / ".venv" / "bin" / "torchrun"
    return [str(venv)] if venv.exists() else [sys.executable, "-m", "torch.distributed.run"]


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy (every process, /proc/stat), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit: float, max_wait_s: float, window_s: float = 2.0) -> float | None:
    """Before a pair: wait (up to ``max_wait_s``) for a ``window_s`` in which the machine's
    other jobs took at most ``limit`` of its CPUs (nothing of ours runs now, so all the busy
    time is theirs). Returns the last window's share; on a shared machine a load comes and
    goes over minutes, and a pair started into one is disturbed for certain."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = busy_cpu_s(), time.monotonic()
        time.sleep(window_s)
        b1, t1 = busy_cpu_s(), time.monotonic()
        if b0 is None or b1 is None:
            return None
        busy = (b1 - b0) / ((t1 - t0) * os.cpu_count())
        if busy <= limit or t1 >= deadline:
            return busy


def children_cpu_s() -> float:
    """CPU seconds of the runs so far (torchrun and its workers, once waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(n: int, straggler: bool, out: Path, args) -> dict:
    """One real job; its figures per rank."""
    cmd = [*torchrun_cmd(), "--standalone", "--nproc-per-node", str(n), "-m", "ddp_fnn", "train", *TRAIN,
           "--max-steps", str(args.steps), "--global-batch-size", str(args.rows_per_rank * n),
           "--output", str(out)]
    if straggler:
        cmd += ["--slow-rank", str(SLOW_RANK), "--slow-ms", f"{SLOW_MS:g}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    busy0, ours0, t0 = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    wall, busy1, ours = time.perf_counter() - t0, busy_cpu_s(), children_cpu_s() - ours0
    # What other jobs on the machine took meanwhile: the run's figures are only as clean
    # as this is small (flock serialises only the measurements that take the lock).
    others = busy1 - busy0 - ours if busy0 is not None and busy1 is not None else None
    if proc.returncode != 0:
        raise SystemExit(f"straggler.py: error: run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stderr.strip()[-2000:]}")
    summary = fileio.loads((out / "summary.json").read_text())
    ranks = []
    for r in range(n):
        s = summary["ranks"][r]
        lines = stepfile.read(out / f"steps-rank{r}.jsonl")
        same = lines[1:]                  # the steps summary.json's means are over
        ranks.append({
            "rank": r,
            "wait_s": s["wait_for_peers_per_step_s"],
            "transfer_s": s["transfer_per_step_s"],
            "last_ready_share": s["last_ready_share"],
            "compute_s": statistics.fmean(d["data_s"] + d["forward_s"] + d["backward_s"] for d in same),
            "transfer_median_s": statistics.median(d["transfer_s"] for d in lines[WARMUP:]),
            "step_s": s["step_time_mean_s"],
        })
    return {"world_size": n, "straggler": straggler, "wall_s": wall, "cpu_s": ours,
            "others_cpu_share": None if others is None else max(others, 0.0) / (wall * os.cpu_count()),
            "command": f"OMP_NUM_THREADS={args.threads} " + " ".join(cmd), "ranks": ranks}


def compare(clean: dict, slow: dict) -> dict:
    """One round's figures at one world size."""
    n = clean["world_size"]
    c, s = clean["ranks"], slow["ranks"]
    own1 = s[SLOW_RANK]["compute_s"] - SLOW_MS / 1e3          # rank 1's compute without the injection
    others = {}
    for r in range(n):
        if r == SLOW_RANK:
            continue
        expected = SLOW_MS / 1e3 + own1 - s[r]["compute_s"]
        others[str(r)] = {"wait_s": s[r]["wait_s"], "expected_s": expected,
                          "compute_difference_s": own1 - s[r]["compute_s"], "ratio": s[r]["wait_s"] / expected}
    min_expected = min(o["expected_s"] for o in others.values())
    transfer = {str(r): {"clean_s": c[r]["transfer_s"], "straggler_s": s[r]["transfer_s"],
                         "ratio": s[r]["transfer_s"] / c[r]["transfer_s"],
                         "clean_median_s": c[r]["transfer_median_s"], "straggler_median_s": s[r]["transfer_median_s"],
                         "median_ratio": s[r]["transfer_median_s"] / c[r]["transfer_median_s"]} for r in range(n)}
    return {
        "others": others,
        "rank1": {"wait_s": s[SLOW_RANK]["wait_s"], "share_of_expected": s[SLOW_RANK]["wait_s"] / min_expected,
                  "last_ready_share": s[SLOW_RANK]["last_ready_share"]},
        "transfer": transfer,
        "others_cpu_share": {"clean": clean["others_cpu_share"], "straggler": slow["others_cpu_share"]},
    }


def disturbed(cmp: dict, limit: float) -> bool:
    """Whether other jobs took more than ``limit`` of the CPUs during either run of the pair
    (unknown counts as disturbed: nothing says the pair was quiet)."""
    return any(v is None or v > limit for v in cmp["others_cpu_share"].values())


def ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms"


def print_round(r: int, n: int, order: str, cmp: dict) -> None:
    share = cmp["others_cpu_share"]
    busy = ", ".join(f"{k} {v:.0%}" for k, v in share.items() if v is not None)
    print(f"round {r + 1}, {n} ranks ({order} first; other jobs' share of the CPUs: {busy or 'unknown'}"
          f"{': DISTURBED' if cmp['disturbed'] else ''})")
    for rank, t in cmp["transfer"].items():
        print(f"  rank {rank} transfer: clean {ms(t['clean_s'])}, straggler {ms(t['straggler_s'])}, "
              f"ratio {t['ratio']:.3f}   (medians over steps {ms(t['clean_median_s'])}, "
              f"{ms(t['straggler_median_s'])}, ratio {t['median_ratio']:.3f})")
    for rank, o in cmp["others"].items():
        print(f"  rank {rank} wait {ms(o['wait_s'])}, expected {ms(o['expected_s'])} "
              f"(20 ms {o['compute_difference_s'] * 1e3:+.2f} ms compute difference), ratio {o['ratio']:.3f}")
    k = cmp["rank1"]
    print(f"  rank 1 wait {ms(k['wait_s'])} ({k['share_of_expected']:.1%} of the smallest expected), "
          f"last ready in {k['last_ready_share']:.1%} of steps")


def medians(rounds: list[dict]) -> dict:
    """Medians over the rounds of every per-round figure (same structure as compare's)."""
    def med(get):
        return statistics.median(get(x) for x in rounds)
    first = rounds[0]
    return {
        "others": {r: {k: med(lambda x, r=r, k=k: x["others"][r][k]) for k in v} for r, v in first["others"].items()},
        "rank1": {k: med(lambda x, k=k: x["rank1"][k]) for k in first["rank1"]},
        "transfer": {r: {k: med(lambda x, r=r, k=k: x["transfer"][r][k]) for k in v}
                     | {"ratio_of_medians": med(lambda x, r=r: x["transfer"][r]["straggler_s"])
                        / med(lambda x, r=r: x["transfer"][r]["clean_s"])}
                     for r, v in first["transfer"].items()},
    }


def claims(m: dict) -> dict:
    return {
        "a_wait_within_20pct": all(abs(o["ratio"] - 1) <= WAIT_REL for o in m["others"].values()),
        "b_rank1_wait_under_10pct": m["rank1"]["share_of_expected"] < RANK1_SHARE,
        "c_rank1_last_ready_90pct": m["rank1"]["last_ready_share"] >= LAST_READY,
        "d_transfer_within_20pct": all(abs(t["ratio"] - 1) <= TRANSFER_REL for t in m["transfer"].values()),
        "d_median_over_steps_within_20pct": all(abs(t["median_ratio"] - 1) <= TRANSFER_REL
                                                for t in m["transfer"].values()),
    }


def print_medians(n: int, k: int, m: dict, ok: dict, rounds: list[dict], retries: int) -> None:
    bad = sum(x["disturbed"] for x in rounds)
    print(f"{n} ranks, medians over {k} rounds" + (f" ({bad} of them disturbed: no quiet pair in "
                                                   f"{1 + retries} tries)" if bad else ""))
    for rank, t in m["transfer"].items():
        ratios = [x["transfer"][rank]["ratio"] for x in rounds]
        print(f"  rank {rank} transfer: clean {ms(t['clean_s'])}, straggler {ms(t['straggler_s'])}, "
              f"ratio {t['ratio']:.3f} (per round {min(ratios):.3f}..{max(ratios):.3f}; of medians "
              f"{t['ratio_of_medians']:.3f}; medians over steps {t['median_ratio']:.3f})")
    for rank, o in m["others"].items():
        print(f"  rank {rank} wait {ms(o['wait_s'])}, expected {ms(o['expected_s'])}, ratio {o['ratio']:.3f}")
    print(f"  rank 1 wait {ms(m['rank1']['wait_s'])} ({m['rank1']['share_of_expected']:.1%} of expected), "
          f"last ready {m['rank1']['last_ready_share']:.1%}")
    print("  " + ", ".join(f"{k}: {'holds' if v else 'FAILS'}" for k, v in ok.items()))


def positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonnegative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def world_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError(f"every world size must be >= 2 (rank 1 is the straggler), got {text!r}")
    return sizes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", type=world_sizes, default=[2, 4], help="comma-separated (default 2,4)")
    p.add_argument("--rounds", type=positive, default=5, help="rounds; each one clean and one straggler run "
                   "per world size (default 5)")
    p.add_argument("--steps", type=positive, default=60, help="steps a run (default 60, as the test)")
    p.add_argument("--rows-per-rank", type=positive, default=4, help="rows a rank a step (default 4, as the test)")
    p.add_argument("--threads", type=positive, default=1, help="OMP_NUM_THREADS of the workers (default 1, "
                   "as the test)")
    p.add_argument("--max-others-share", type=share, default=0.10,
                   help="a pair of runs during which other jobs took more than this share of the machine's "
                   "CPUs (either run) is disturbed and repeated (default 0.10)")
    p.add_argument("--retries", type=nonnegative, default=3, help="repeats of a disturbed pair before the round counts "
                   "its least disturbed one (default 3)")
    p.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait, before each pair, for the "
                   "machine to be quiet by --max-others-share (default 120)")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary directory, "
                   "removed)")
    p.add_argument("--json", dest="json_file", type=Path, default=None, help="write every figure here")
    args = p.parse_args()
    if args.steps <= WARMUP + 1:
        p.error(f"--steps must be > {WARMUP + 1}, got {args.steps}")
    out = args.out or Path(tempfile.mkdtemp(prefix="ddp-fnn-straggler."))
    runs: list[dict] = []
    per_n: dict[int, list[dict]] = {n: [] for n in args.world_sizes}
    discarded: dict[int, list[dict]] = {n: [] for n in args.world_sizes}
    try:
        for r in range(args.rounds):
            for n in args.world_sizes:
                order = [False, True] if r % 2 == 0 else [True, False]
                attempts = []
                for attempt in range(args.retries + 1):
                    wait_for_quiet(args.max_others_share, args.quiet_wait)
                    tag = f"round{r + 1}-n{n}" + (f"-retry{attempt}" if attempt else "")
                    got = {s: run_one(n, s, out / f"{tag}-{'straggler' if s else 'clean'}", args) for s in order}
                    runs += [got[s] for s in order]
                    cmp = compare(got[False], got[True])
                    cmp["disturbed"] = disturbed(cmp, args.max_others_share)
                    attempts.append(cmp)
                    print_round(r, n, "straggler" if order[0] else "clean", cmp)
                    sys.stdout.flush()
                    if not cmp["disturbed"]:
                        break
                # A disturbed pair compares the other jobs' load, not the straggler: the round
                # counts its least disturbed attempt (still marked so when none was quiet).
                best = min(attempts, key=lambda x: max(v or 0.0 for v in x["others_cpu_share"].values()))
                per_n[n].append(best)
                discarded[n] += [x for x in attempts if x is not best]
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    result = {"settings": {"world_sizes": args.world_sizes, "rounds": args.rounds, "steps": args.steps,
                           "rows_per_rank": args.rows_per_rank, "threads": args.threads,
                           "max_others_share": args.max_others_share, "retries": args.retries,
                           "quiet_wait_s": args.quiet_wait, "slow_rank": SLOW_RANK,
                           "slow_ms": SLOW_MS, "train": TRAIN, "argv": sys.argv},
              "world_sizes": {}, "runs": runs}
    for n, rounds in per_n.items():
        m = medians(rounds)
        ok = claims(m)
        print_medians(n, args.rounds, m, ok, rounds, args.retries)
        result["world_sizes"][str(n)] = {"rounds": rounds, "medians": m, "claims": ok,
                                         "disturbed_rounds_counted": sum(x["disturbed"] for x in rounds),
                                         "disturbed_attempts_repeated": discarded[n]}
    if args.json_file:
        args.json_file.write_text(fileio.dumps(result, indent=1) + "\n")
    return 0 if all(v for w in result["world_sizes"].values() for v in w["claims"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
