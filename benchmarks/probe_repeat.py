"""The pre-training probe, repeated: how it fitted in each of many real runs, whether its
traffic is in summary.json and in Prometheus, and what it costs.

    python benchmarks/probe_repeat.py demo --runs 20        # launch/demo.sh, 2 ranks on loopback
    python benchmarks/probe_repeat.py netns --runs 10       # launch/netns-cluster.sh --nodes 4 (root)
    python benchmarks/probe_repeat.py cost --runs 15        # probe.probe alone, timed, 2 ranks on loopback

Per run it prints one line: the fit's method, alpha, beta, the probe's wire bytes in
summary.json, and the probe counters scraped from every rank's /metrics in the run's
--metrics-linger window after its last step (``ddp_fnn_probe_wire_bytes_total`` and
``ddp_fnn_probe_payload_bytes_total``,
compared with summary.json's ``probe``). A demo run is scraped on 127.0.0.1; a
namespace node from inside its namespace (``ip netns exec ... curl``). For namespace
runs it also compares each node's kernel TX payload (netstats.json: TX bytes less one
Ethernet + IP + TCP header per packet) with the wire bytes its rank reports, steps plus
probe. ``--json FILE`` writes every run's record. Results: docs/netmodel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COUNTERS = ("ddp_fnn_probe_wire_bytes_total", "ddp_fnn_probe_payload_bytes_total")
FAILED_FIT = ("could not fit", "least-squares fit failed")


def probe_counters(text: str) -> dict | None:
    """The probe counters in a /metrics page, or None before the probe has counted (0)."""
    from prometheus_client.parser import text_string_to_metric_families
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in COUNTERS}
    return got if got.get(COUNTERS[0], 0) > 0 else None


def scrape_at_the_end(proc: subprocess.Popen, summary: Path, fetchers: dict) -> dict:
    """Once rank 0 has written ``summary`` (the run is over, every rank lingers with its
    /metrics up), scrape each target until it answers or the run has exited. Nothing is
    scraped while the probe or the steps run: on 2 cores a scrape every half second
    (a curl per namespace) slowed the probe it was watching."""
    while not summary.exists() and proc.poll() is None:
        time.sleep(0.2)
    found: dict = {}
    while True:
        done = proc.poll() is not None
        for key, fetch in fetchers.items():
            if key not in found:
                try:
                    counters = probe_counters(fetch())
                except Exception:          # gone already, or not answering: try again
                    counters = None
                if counters:
                    found[key] = counters
        if done or len(found) == len(fetchers):
            return found
        time.sleep(0.2)


def free_port_pair() -> int:
    """A base port B with B and B+1 free on loopback (demo.sh serves rank r on B+r)."""
    for base in range(19400, 20400, 2):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise SystemExit("probe_repeat: no free port pair in 19400..20400")


def record(kind: int, i: int, rc: int, summary: dict, stderr: str, scraped: dict, ranks: int) -> dict:
    probe = summary.get("probe") or {}
    pred = summary.get("prediction") or {}
    prom_ok = len(scraped) == ranks and all(
        c[COUNTERS[0]] == probe.get("wire_bytes") and c[COUNTERS[1]] == probe.get("payload_bytes")
        for c in scraped.values())
    return {"where": kind, "run": i, "rc": rc, "method": probe.get("method"), "alpha_s": pred.get("alpha_s"),
            "beta_bytes_per_second": pred.get("beta_bytes_per_second"),
            "largest_size": max(probe["sizes"]) if probe.get("sizes") else None,
            "attempts": len(probe.get("attempt_sizes") or []),
            "summary_probe_wire_bytes": probe.get("wire_bytes"),
            "summary_has_probe": bool(probe.get("wire_bytes")),
            "prometheus_ranks_scraped": len(scraped), "prometheus_matches_summary": prom_ok,
            "failed_fit_note": any(s in stderr for s in FAILED_FIT)}


def line(r: dict) -> str:
    beta = r["beta_bytes_per_second"]
    alpha = r["alpha_s"]
    tx = f" tx-vs-reported {r['tx_deviation']}" if "tx_deviation" in r else ""
    return (f"{r['where']} {r['run']:>2} rc {r['rc']} {r['method']} alpha_us "
            f"{alpha * 1e6 if alpha is not None else float('nan'):.0f} beta_MB/s "
            f"{beta / 1e6 if beta else float('nan'):.0f} top_MiB {(r['largest_size'] or 0) / 2 ** 20:.2f} "
            f"attempts {r['attempts']} summary_probe_wire {r['summary_probe_wire_bytes']} "
            f"prometheus {r['prometheus_ranks_scraped']} ranks match {r['prometheus_matches_summary']} "
            f"fit_failed_note {r['failed_fit_note']}{tx}")


def demo_run(i: int, steps: int) -> dict:
    port = free_port_pair()
    out = Path(tempfile.mkdtemp(prefix="probe-demo-"))
    cmd = [str(REPO / "launch/demo.sh"), "--max-steps", str(steps), "--metrics-linger", "5", "--progress", "none",
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "METRICS_PORT": str(port)})
    fetchers = {r: (lambda r=r: urllib.request.urlopen(f"http://127.0.0.1:{port + r}/metrics", timeout=2)
                    .read().decode()) for r in range(2)}
    scraped = scrape_at_the_end(proc, out / "summary.json", fetchers)
    stderr = proc.communicate()[1]
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return record("demo", i, proc.returncode, summary, stderr, scraped, 2)


def netns_run(i: int, nodes: int, steps: int, layers: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="probe-netns-"))
    cmd = [str(REPO / "launch/netns-cluster.sh"), "--nodes", str(nodes), "--out", str(out), "--",
           "--max-steps", str(steps), "--progress", "none", "--layers", layers, "--metrics-port", "9400",
           "--metrics-linger", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tag = f"ddpfnn-{proc.pid}-"      # the script names its namespaces after its own PID

    def fetch(k: int) -> str:
        got = subprocess.run(["ip", "netns", "exec", f"{tag}{k}", "curl", "-sf", "--max-time", "2",
                              f"http://10.213.0.{k + 1}:9400/metrics"], capture_output=True, text=True)
        if got.returncode:
            raise OSError(got.returncode)
        return got.stdout
    scraped = scrape_at_the_end(proc, out / "node0" / "summary.json", {k: (lambda k=k: fetch(k)) for k in range(nodes)})
    stderr = proc.communicate()[1]
    logs = "".join(p.read_text(errors="replace") for p in out.glob("node*.log"))
    path = out / "node0" / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    r = record(f"netns{nodes}", i, proc.returncode, summary, stderr + logs, scraped, nodes)
    stats_path = out / "netstats.json"
    if summary and stats_path.exists():
        stats = json.loads(stats_path.read_text())
        header = 14 + 20 + 20 + (12 if stats.get("tcp_timestamps", 1) else 0)
        probe_wire = (summary.get("probe") or {}).get("wire_bytes", 0)
        per_rank = summary.get("ranks") or [summary] * nodes
        devs = []
        for node, rank in zip(stats["nodes"], per_rank):
            sent = node["tx_bytes"] - node["tx_packets"] * header
            wire = rank["allreduce_wire_bytes_total"] + probe_wire
            devs.append(round((sent - wire) / wire, 4))
        r["tx_deviation"] = devs
    return r


# ---------------------------------------------------------------------------------------
# the probe's own cost: torchrun runs this file as its worker
# ---------------------------------------------------------------------------------------

def cost_worker(runs: int, largest: int) -> None:
    sys.path.insert(0, str(REPO))
    from ddp_fnn.perfmodel import probe
    from ddp_fnn import dist as ddist
    world = ddist.setup("gloo", "auto", 120)
    rows = []
    for _ in range(runs):
        probe.barrier(world)
        t0 = time.perf_counter()
        p = probe.probe(world, largest)
        rows.append((p, time.perf_counter() - t0))
    if world.rank == 0:
        for k, (p, dt) in enumerate(rows, 1):
            print(f"cost {k:>2} {p['method']} alpha_us {p['alpha_s'] * 1e6:.0f} beta_MB/s "
                  f"{p['beta_bytes_per_second'] / 1e6:.0f} attempts {len(p['attempt_sizes'])} top_MiB "
                  f"{p['sizes'][-1] / 2 ** 20:.2f} seconds {dt:.3f}")
        secs = [dt for _, dt in rows]
        betas = [p["beta_bytes_per_second"] for p, _ in rows]
        print(f"cost: {sum(p['method'] == 'least-squares' for p, _ in rows)}/{runs} least squares, beta "
              f"{min(betas) / 1e6:.0f} .. {max(betas) / 1e6:.0f} MB/s (max/min {max(betas) / min(betas):.2f}), "
              f"seconds per probe median {statistics.median(secs):.3f} max {max(secs):.3f}")
    ddist.teardown()


def summarize(rows: list[dict]) -> str:
    methods = [r["method"] for r in rows]
    betas = [r["beta_bytes_per_second"] for r in rows if r["beta_bytes_per_second"]]
    text = (f"{rows[0]['where']}: {len(rows)} runs, rc 0: {sum(r['rc'] == 0 for r in rows)}, least squares "
            f"{methods.count('least-squares')}, two-point {methods.count('two-point')}, largest "
            f"{methods.count('largest')}, fit-failed notes {sum(r['failed_fit_note'] for r in rows)}, beta "
            f"{min(betas) / 1e6:.0f} .. {max(betas) / 1e6:.0f} MB/s (max/min {max(betas) / min(betas):.2f}), "
            f"probe in summary.json {sum(r['summary_has_probe'] for r in rows)}/{len(rows)}, Prometheus counters "
            f"on every rank and equal to summary.json {sum(r['prometheus_matches_summary'] for r in rows)}/{len(rows)}")
    devs = [d for r in rows for d in r.get("tx_deviation", [])]
    if devs:
        text += f", kernel TX vs reported (steps + probe) per node {min(devs):+.2%} .. {max(devs):+.2%}"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("where", choices=("demo", "netns", "cost", "_worker"))
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="--max-steps per run (demo 60, netns 30)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--layers", default="256,512,512,10", help="netns runs' --layers")
    ap.add_argument("--largest", type=int, default=298_000, help="cost: the largest bucket (the demo's model: 298 KB)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.where == "_worker":
        cost_worker(a.runs, a.largest)
        return 0
    if a.where == "cost":
        return subprocess.run([str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node", "2", __file__,
                               "_worker", "--runs", str(a.runs or 15), "--largest", str(a.largest)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    rows = []
    for i in range(1, (a.runs or (20 if a.where == "demo" else 10)) + 1):
        r = demo_run(i, a.steps or 60) if a.where == "demo" else netns_run(i, a.nodes, a.steps or 30, a.layers)
        print(line(r), flush=True)
        rows.append(r)
    print(summarize(rows), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
