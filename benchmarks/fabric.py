"""What packet loss does to training: 2 namespace nodes on 1 Gbit/s links, node1's egress
losing 0, 0.5, 1 and 2 % of its frames, and the Mathis et al. estimate beside busbw.

Needs root, iproute2, util-linux and nftables, as launch/netns-cluster.sh --loss does.
docs/fabric.md's table came from this command (--out chooses where the runs go):

    .venv/bin/python benchmarks/fabric.py --out DIR --json fabric.json

For each loss rate it runs, one after the other (the runs share the machine's cores),

    OMP_NUM_THREADS=1 launch/netns-cluster.sh --nodes 2 --link-rate 1gbit [--loss 1:PCT] \\
        --out DIR/loss-PCT -- --layers 256,1024,1024,1 --samples 4096 --global-batch-size 32 \\
        --max-steps 30 --no-probe --log-every 5 --metrics-port 0 --progress none

(5.25 MB of gradient a step in one DDP bucket, so each rank sends 5.25 MB a step) and
reads node0's summary.json (every rank's figures, including its namespace's TCP counters)
and netstats.json (the frames the switch dropped). Per run: mean and p99 step time over
rank 0's steps after the first 3 (its step file), busbw (rank 0: payload / comm time x
2(N-1)/N), node1's retransmitted segments and their share of its segments sent, and the
Mathis estimate MSS / (RTT sqrt(p)) x sqrt(3/2), capped at the link, with MSS 1448 bytes
(MTU 1500, TCP timestamps), p the configured loss, and RTT the smallest round trip of
train's clock ping-pong between the ranks (summary.json clock_offsets: 2 x bound_start_s,
a Gloo send/recv of 8 bytes: the unloaded path, no queue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ddp_fnn.core import units  # noqa: E402
from ddp_fnn.observe import stepfile  # noqa: E402
from ddp_fnn.perfmodel import netmodel  # noqa: E402  (the repo's package, without installing it)

SCRIPT = REPO / "launch" / "netns-cluster.sh"
MSS = 1448
LINK = "1gbit"
TRAIN = ["--layers", "256,1024,1024,1", "--samples", "4096", "--global-batch-size", "32", "--no-probe",
         "--log-every", "5", "--metrics-port", "0", "--progress", "none"]
WARMUP = 3


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def run_one(loss: float, out: Path, steps: int) -> dict:
    cmd = [str(SCRIPT), "--nodes", "2", "--link-rate", LINK]
    if loss:
        cmd += ["--loss", f"1:{loss:g}"]
    cmd += ["--out", str(out), "--", *TRAIN, "--max-steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    row = {"loss_percent": loss, "command": "OMP_NUM_THREADS=1 " + " ".join(cmd)}
    if proc.returncode != 0:
        return row | {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    s = json.loads((out / "node0" / "summary.json").read_text())
    net = json.loads((out / "netstats.json").read_text())
    steps0 = [d["step_s"] for d in stepfile.read(out / "node0" / "steps-rank0.jsonl")[WARMUP:]]
    tcp1 = s["ranks"][1]["tcp"]
    rtt = 2 * max(c["bound_start_s"] or 0 for c in s["clock_offsets"])
    link = units.parse_rate(LINK)
    mathis = netmodel.mathis_rate(MSS, rtt, loss / 100, link) if rtt > 0 else None
    return row | {
        "steps": len(steps0),
        "step_time_mean_s": statistics.fmean(steps0),
        "step_time_p99_s": quantile(steps0, 0.99),
        "transfer_per_step_s": s["ranks"][0]["transfer_per_step_s"],
        "busbw_bytes_per_second": s["busbw_bytes_per_second"],
        "node1_dropped_frames": net["nodes"][1]["loss_dropped_packets"],
        "node1_retransmitted_segments": tcp1["retransmitted_segments"],
        "node1_sent_segments": tcp1["sent_segments"],
        "node1_retransmit_ratio": tcp1["retransmit_ratio"],
        "node0_retransmitted_segments": s["ranks"][0]["tcp"]["retransmitted_segments"],
        "min_rtt_s": rtt,
        "mathis_bytes_per_second": mathis,
    }


def table(rows: list[dict]) -> str:
    lines = ["| loss (node1) | step mean | step p99 | busbw | node1 retransmits (share) | dropped by the switch "
             "| min RTT | Mathis estimate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss_percent']:g} % | failed: {r['error'][:80]} |||||||")
            continue
        m = r["mathis_bytes_per_second"]
        lines.append(
            f"| {r['loss_percent']:g} % | {r['step_time_mean_s'] * 1e3:.0f} ms | {r['step_time_p99_s'] * 1e3:.0f} ms "
            f"| {r['busbw_bytes_per_second'] / 1e6:.1f} MB/s | {r['node1_retransmitted_segments']:,} "
            f"({(r['node1_retransmit_ratio'] or 0):.2%}) | {r['node1_dropped_frames']:,} "
            f"| {r['min_rtt_s'] * 1e6:.0f} us | {m / 1e6:.1f} MB/s{' (the link)' if r['loss_percent'] == 0 else ''} |"
            if m is not None else "| n/a |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a new temporary directory)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--loss", default="0,0.5,1,2", help="loss percentages on node1's egress (default 0,0.5,1,2)")
    ap.add_argument("--steps", type=int, default=30, help="steps a run (default 30)")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="ddp-fnn-fabric."))
    rows = []
    for loss in (float(x) for x in a.loss.split(",")):
        rows.append(run_one(loss, out / f"loss-{loss:g}", a.steps))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
