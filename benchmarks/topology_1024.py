"""The fabric model at 1,024 GPUs: how long a prediction takes, and where the load goes.

    .venv/bin/python benchmarks/topology_1024.py [--topology FILE] [--layers 8192,...]
        [--compute-ms 20] [--bucket-mb 25] [--png docs/topology-1024.png]

For each all-reduce algorithm (ring, tree, hierarchical) it runs
``topology.estimate`` on deploy/topologies/h100-128x8-400g-2to1.toml (128 servers x 8
H100, 8 rails of 400 Gbit/s, 2:1 oversubscribed rail leaves) and prints the bytes per
step on each tier, the bottleneck link and its utilisation, the step, comm and exposed
times, and the wall-clock seconds the estimate took (load + link mapping + max-min
sharing + the bucket time line), then per DDP bucket NCCL's algorithm, protocol, channels,
time and bound (perfmodel/nccl.py). The brief's target is under 5 s each on this host.

With matplotlib installed it draws every link's utilisation (busy time / step time),
one panel per algorithm, links grouped by tier, into --png (docs/topology-1024.png).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddp_fnn.core import units
from ddp_fnn.perfmodel import estimate as estimator
from ddp_fnn.perfmodel import topology

REPO = Path(__file__).resolve().parents[1]
TIER_COLOURS = {"intra": "tab:green", "nic": "tab:blue", "uplink": "tab:red"}


def run(path: Path, widths: list[int], compute_s: float, bucket_mb: float) -> list[tuple[topology.TopologyEstimate, float]]:
    out = []
    for algorithm in topology.ALGORITHMS:
        t0 = time.perf_counter()
        topo = topology.load(path)
        est = topology.estimate(topo, widths, compute_s=compute_s, bucket_mb=bucket_mb, algorithm=algorithm)
        out.append((est, time.perf_counter() - t0))
    return out


def report(results) -> None:
    fb, fs = units.format_bytes, units.format_seconds
    for est, elapsed in results:
        tiers = est.tier_bytes_per_step
        print(f"== {est.algorithm} ({est.topology.world_size} GPUs, {len(est.link_bytes_per_step)} links loaded)")
        print(f"   per step: intra {fb(tiers['intra'])}, NIC {fb(tiers['nic'])}, uplink/spine {fb(tiers['uplink'])}")
        print(f"   bottleneck {est.bottleneck_link}: {fb(est.bottleneck_bytes_per_step)}, utilisation "
              f"{est.bottleneck_utilisation:.1%}, burst {units.format_rate(est.burst_bytes_per_second)}, "
              f"duty cycle {est.duty_cycle:.1%}")
        print(f"   step {fs(est.step_time_s)}, comm {fs(est.comm_time_s)}, exposed {fs(est.exposed_s)}; "
              f"busbw at 8 GiB {topology.busbw(est.topology, 8 * 2 ** 30, est.algorithm) / 1e9:.1f} GB/s")
        print(f"   elapsed {elapsed:.3f} s")


def nccl_report(path: Path, widths: list[int], bucket_mb: float) -> None:
    """Per DDP bucket, NCCL's choice and its bound (perfmodel/nccl.py), and how long that took."""
    t0 = time.perf_counter()
    rows = estimator.nccl_bucket_rows(topology.load(path), widths, bucket_mb)
    elapsed = time.perf_counter() - t0
    print("== nccl (NCCL backend: the tuner's choice per bucket, the pipeline's time)")
    for r in rows:
        print(f"   {units.format_bytes(r['bytes'])} x{r['buckets']}: {r['algorithm']}/{r['protocol']}, "
              f"{r['channels']} channels, {units.format_seconds(r['time_s'])} (latency + fill "
              f"{units.format_seconds(r['latency_s'])}), busbw {units.format_rate(r['busbw_bytes_per_second'])}, "
              f"{r['bound']}-bound")
    print(f"   elapsed {elapsed:.3f} s")


def plot(results, png: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'ddp-fnn[plot]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), sharey=True)
    for ax, (est, _) in zip(axes, results):
        util = est.utilisation()
        links = sorted(util, key=lambda k: (topology.TIERS.index(topology.link_tier(k)), k))
        for tier in topology.TIERS:
            xs = [i for i, k in enumerate(links) if topology.link_tier(k) == tier]
            if xs:
                ax.scatter(xs, [100 * util[links[i]] for i in xs], s=2, color=TIER_COLOURS[tier], label=tier)
        ax.set_title(f"{est.algorithm}: bottleneck {est.bottleneck_link} at {est.bottleneck_utilisation:.0%} "
                     f"of a {units.format_seconds(est.step_time_s)} step", fontsize=9)
        ax.set_ylabel("busy / step (%)")
        ax.legend(loc="upper left", fontsize=7, markerscale=4)
    axes[-1].set_xlabel(f"link (grouped by tier; {results[0][0].topology.name})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", type=Path, default=REPO / "deploy" / "topologies" / "h100-128x8-400g-2to1.toml")
    ap.add_argument("--layers", default="8192,8192,8192,8192,8192,10",
                    help="FNN widths (default: 268M parameters, 1.07 GB of fp32 gradient)")
    ap.add_argument("--compute-ms", type=float, default=20.0,
                    help="one rank's forward + backward + optimizer time (an assumption, not a measurement)")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "topology-1024.png")
    args = ap.parse_args()
    widths = [int(w) for w in args.layers.split(",")]
    results = run(args.topology, widths, args.compute_ms / 1e3, args.bucket_mb)
    report(results)
    nccl_report(args.topology, widths, args.bucket_mb)
    plot(results, args.png)


if __name__ == "__main__":
    main()
