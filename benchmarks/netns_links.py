"""Network load on shaped links: a communication-bound FNN on 2 and 4 namespace nodes,
with each node's egress unshaped, capped at 1 Gbit/s and at 100 Mbit/s.

Needs root, iproute2 (ip, tc) and util-linux (unshare), as launch/netns-cluster.sh does.
The figures in README.md and docs/links.md came from this command, run as root (--out
only chooses where the runs' logs and summaries go):

    .venv/bin/python benchmarks/netns_links.py --out DIR --json links.json

For every (nodes, link rate) it runs, one after the other (the runs share the machine's
cores, so they must not overlap),

    OMP_NUM_THREADS=1 launch/netns-cluster.sh --nodes N [--link-rate RATE] --out DIR/N-RATE -- \\
        --layers 256,1024,1024,1024,1 --global-batch-size 32 --lr 0.0005 --max-steps 20 \\
        --metrics-port 0 --progress none

and reads rank 0's DIR/N-RATE/node0/summary.json (its `ranks` list has every rank's own
figures) and DIR/N-RATE/netstats.json. The FNN has 2,363,393 parameters: 9.45 MB of fp32
gradient a step in one DDP bucket (cap 25 MiB), so each rank sends 9.45 MB a step at 2
nodes and 14.2 MB at 4 (2(N-1)/N of it). A small global batch keeps the compute short, so
the step is mostly communication and the ranks reach the all-reduce together.

Per run it records the step time (median and mean), the communication time per step
(union of the step's all-reduce intervals, rank 0), its exposed part, algbw and busbw
(rank 0, and the largest over ranks), the cost model's predicted communication time and
exposed time (alpha and beta from train's probe of the same fabric before the first
step), and the prediction's relative error, (predicted - measured) / measured. It prints
a markdown table and writes every figure as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ddp_fnn.core import fileio, units  # noqa: E402

SCRIPT = REPO / "launch" / "netns-cluster.sh"
LAYERS = "256,1024,1024,1024,1"
UNSHAPED = "unshaped"
PROBE_ROUNDS = 15
"""train's --probe-rounds here. With four single-thread workers on two cores an
all-reduce's time varies by about 10 % from call to call, and the default probe's 5
timed rounds at the start of the job once set beta 16 % below what the 20 steps then
ran at (predicted 521 ms, measured 450 ms, every step 406 to 513 ms); 15 rounds, about
3 s more at 4 nodes (29 s a run instead of 26), average over three times as many calls."""
# A worker that trained to the end can still abort while the interpreter exits (Gloo's
# threads; see launch/repro_ddp_exit.py). Named in the row's error when it is the cause.
EXIT_FAILURES = ("terminate called without an active exception",)


def train_args(layers: str, steps: int, batch: int) -> list[str]:
    """`ddp-fnn train` arguments for every node. lr 0.0005: this deep, wide FNN diverges
    on the synthetic data at the default 0.01 with momentum 0.9."""
    return ["--layers", layers, "--global-batch-size", str(batch), "--lr", "0.0005", "--max-steps", str(steps),
            "--metrics-port", "0", "--progress", "none", "--probe", "--probe-rounds", str(PROBE_ROUNDS)]


def link_bytes_per_second(rate: str) -> float | None:
    return None if rate == UNSHAPED else units.parse_rate(rate)


def rel_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def run_one(nodes: int, rate: str, out: Path, args: list[str], threads: int, timeout_s: float) -> dict:
    """One cluster run; its figures, or a dict with "error"."""
    cmd = [str(SCRIPT), "--nodes", str(nodes)]
    if rate != UNSHAPED:
        cmd += ["--link-rate", rate]
    cmd += ["--out", str(out), "--", *args]
    env = dict(os.environ)
    if threads:
        # One intra-op thread per worker: N single-worker nodes share the machine's cores,
        # and torchrun sets OMP_NUM_THREADS=1 only when it starts several workers itself.
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    wall = time.monotonic() - t0
    row = {"nodes": nodes, "link_rate": rate, "link_bytes_per_second": link_bytes_per_second(rate),
           "wall_time_s": wall, "command": " ".join(cmd), "out": str(out)}
    if proc.returncode != 0:
        logs = "".join(f.read_text(errors="replace") for f in sorted(out.glob("node*.log")))
        cause = next((c for c in EXIT_FAILURES if c in logs), None)
        return row | {"error": f"netns-cluster.sh exited {proc.returncode}"
                               + (f" ({cause!r} in a node's log)" if cause else "")
                               + f": {stderr.strip()[-1000:]}"}
    s = json.loads((out / "node0" / "summary.json").read_text())
    ranks = s.get("ranks") or [s]
    pred = s.get("prediction") or {}
    row |= {
        "world_size": s["world_size"],
        "steps": s["steps"],
        "parameters": s["parameters"],
        "payload_bytes_per_step": s["allreduce_payload_bytes_per_step"],
        "wire_bytes_per_rank_per_step": s["allreduce_wire_bytes_per_step"],
        "allreduce_calls_per_step": s["allreduce_calls_per_step"],
        "step_time_p50_s": s["step_time_p50_s"],
        "step_time_mean_s": s["step_time_mean_s"],
        "comm_time_per_step_s": s["comm_time_per_step_s"],
        "exposed_comm_time_per_step_s": s["exposed_comm_time_per_step_s"],
        "algbw_bytes_per_second": s["algbw_bytes_per_second"],
        "busbw_bytes_per_second": s["busbw_bytes_per_second"],
        "busbw_max_over_ranks_bytes_per_second": max(r["busbw_bytes_per_second"] for r in ranks),
        "predicted_comm_time_per_step_s": s.get("predicted_comm_time_per_step_s"),
        "predicted_exposed_comm_time_per_step_s": s.get("predicted_exposed_comm_time_per_step_s"),
        "comm_prediction_error": rel_error(s.get("predicted_comm_time_per_step_s"), s["comm_time_per_step_s"]),
        "exposed_prediction_error": rel_error(s.get("predicted_exposed_comm_time_per_step_s"),
                                              s["exposed_comm_time_per_step_s"]),
        "probe": {k: pred.get(k) for k in ("source", "alpha_s", "beta_bytes_per_second", "rms_relative_error",
                                           "sizes", "rounds", "compute_time_per_step_s")},
        "ranks": [{k: r.get(k) for k in ("rank", "step_time_p50_s", "step_time_mean_s", "comm_time_per_step_s",
                                         "exposed_comm_time_per_step_s", "algbw_bytes_per_second",
                                         "busbw_bytes_per_second")} for r in ranks],
        "netstats": json.loads((out / "netstats.json").read_text())["nodes"],
    }
    return row


def run(nodes: int, rate: str, out: Path, args: list[str], threads: int = 1, timeout_s: float = 600,
        retries: int = 1) -> dict:
    """run_one, again up to ``retries`` times after a failed run; the row records every
    earlier attempt's error under "failed_attempts"."""
    failed = []
    for attempt in range(retries + 1):
        row = run_one(nodes, rate, out if attempt == 0 else out.with_name(f"{out.name}.retry{attempt}"),
                      args, threads, timeout_s)
        if "error" not in row:
            break
        failed.append(row["error"])
    return row | {"failed_attempts": failed[:-1] if "error" in row else failed}


def stop(proc: subprocess.Popen) -> None:
    """End a cluster run that ran past its limit with SIGTERM (the script then removes its
    namespaces), SIGKILL after a minute, then --cleanup for whatever SIGKILL left."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    subprocess.run([str(SCRIPT), "--cleanup"], capture_output=True, timeout=120)


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.0f}"


def _mbs(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.1f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.1f} %"


def table(rows: list[dict]) -> str:
    head = ("| nodes | link | step p50 (ms) | step mean (ms) | comm (ms) | exposed (ms) | busbw (MB/s) "
            "| max busbw over ranks (MB/s) | link (MB/s) | predicted comm (ms) | error | predicted exposed (ms) "
            "| error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['nodes']} | {r['link_rate']} | failed: {r['error'][:80]} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['nodes']} | {r['link_rate']} | {_ms(r['step_time_p50_s'])} | {_ms(r['step_time_mean_s'])} "
            f"| {_ms(r['comm_time_per_step_s'])} | {_ms(r['exposed_comm_time_per_step_s'])} "
            f"| {_mbs(r['busbw_bytes_per_second'])} | {_mbs(r['busbw_max_over_ranks_bytes_per_second'])} "
            f"| {_mbs(r['link_bytes_per_second'])} | {_ms(r['predicted_comm_time_per_step_s'])} "
            f"| {_pct(r['comm_prediction_error'])} | {_ms(r['predicted_exposed_comm_time_per_step_s'])} "
            f"| {_pct(r['exposed_prediction_error'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="2,4", help="node counts, comma-separated (default 2,4)")
    p.add_argument("--rates", default=f"{UNSHAPED},1gbit,100mbit",
                   help=f"link rates in tc units, or '{UNSHAPED}', comma-separated (default {UNSHAPED},1gbit,100mbit)")
    p.add_argument("--layers", default=LAYERS, help=f"FNN widths (default {LAYERS})")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    p.add_argument("--global-batch-size", type=int, default=32, help="samples per step, whole job (default 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS for every worker; 0 leaves the environment's (default 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for the runs' outputs (default: a new temp dir)")
    p.add_argument("--json", dest="json_file", type=Path, default=None, help="write every figure here")
    p.add_argument("--timeout-s", type=float, default=600, help="limit for each run in seconds (default 600)")
    p.add_argument("--retries", type=int, default=1,
                   help="runs again after a failed run, at most this many times (default 1); "
                        "the JSON keeps the failures")
    args = p.parse_args()

    if os.geteuid() != 0:
        p.error("must run as root (launch/netns-cluster.sh creates network namespaces)")
    for tool in ("ip", "unshare", "tc"):
        if shutil.which(tool) is None:
            p.error(f"'{tool}' not found")
    nodes = [int(n) for n in args.nodes.split(",")]
    rates = [r.strip() for r in args.rates.split(",")]
    for r in rates:
        if r != UNSHAPED:
            try:
                units.parse_rate(r)
            except ValueError as e:
                p.error(f"--rates: {e}")
    out = args.out or Path(tempfile.mkdtemp(prefix="ddp-fnn-links."))
    targs = train_args(args.layers, args.steps, args.global_batch_size)

    rows = []
    t0 = time.monotonic()
    for n in nodes:
        for rate in rates:
            print(f"# {n} nodes, {rate} ...", file=sys.stderr, flush=True)
            row = run(n, rate, out / f"{n}-{rate}", targs, args.threads, args.timeout_s, args.retries)
            for e in row["failed_attempts"]:
                print(f"#   failed, run again: {e}", file=sys.stderr, flush=True)
            print(f"#   {row['wall_time_s']:.1f} s" + (f", {row['error']}" if "error" in row else ""),
                  file=sys.stderr, flush=True)
            rows.append(row)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "layers": args.layers, "steps": args.steps, "global_batch_size": args.global_batch_size,
        "omp_num_threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
        "train_args": targs, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "total_wall_time_s": time.monotonic() - t0, "runs": rows,
    }
    print(table(rows))
    if args.json_file is not None:
        args.json_file.write_text(fileio.dumps(report, indent=2) + "\n")
        print(f"# wrote {args.json_file}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
