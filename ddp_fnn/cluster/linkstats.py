"""A sampled TX time series of the namespace cluster's links (netns-cluster.sh --sample-ms).

    python3 linkstats.py sample OUT.jsonl MS NAME=NETNS:IFACE...   (the script runs this)
    python -m ddp_fnn.cluster.linkstats plot LINKSTATS.jsonl OUT.png [--from S] [--to S]

``sample`` writes one strict-JSON line every MS milliseconds until SIGTERM (and one last
line then):

    {"t": 1718000000.123, "tx_bytes": {"node0": 123, "leaf0.up": 456, ...},
     "tx_packets": {...}}

``t`` is the Unix time of the reading, the counters are the kernel's running totals (not
differences), by link: ``nodeK`` is node K's eth0; ``leafJ.up`` the leaf end of leaf J's
uplink (what it sends towards the spine), ``leafJ.down`` the spine end (what the spine
sends down to leaf J) -- the names of topology.py's links.

Why it reads /proc/thread-self/net/dev after setns(2) rather than /sys/class/net: sysfs
shows the devices of the namespace that mounted it, so reading another namespace's
/sys/class/net needs a process in a mount namespace of its own per read (what
`ip netns exec` does: a fork, an exec and a mount each time, too slow and too heavy for
a 10 ms period on two shared cores). /proc/net/dev follows the reading thread's network
namespace and shows the same counters (both come from dev_get_stats), so one process
that hops between the namespaces' file descriptors reads every link in well under a
millisecond, without forking.

This file runs as a plain script in the cluster's root namespace and needs only the
standard library (the plot needs ddp_fnn and matplotlib).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000


def _setns():
    libc = ctypes.CDLL(None, use_errno=True)

    def setns(fd: int) -> None:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return setns


def read_dev(path: str = "/proc/thread-self/net/dev") -> dict[str, tuple[int, int]]:
    """Interface -> (tx_bytes, tx_packets) in the calling thread's network namespace."""
    out = {}
    with open(path) as f:
        for line in f.readlines()[2:]:          # two header lines
            name, _, rest = line.partition(":")
            v = rest.split()
            # receive: bytes packets errs drop fifo frame compressed multicast; then transmit
            out[name.strip()] = (int(v[8]), int(v[9]))
    return out


def sample(out_path: str, period_ms: float, specs: list[str]) -> int:
    links = []                                  # (name, netns, iface)
    for s in specs:
        name, _, where = s.partition("=")
        ns, _, iface = where.partition(":")
        if not (name and ns and iface):
            print(f"linkstats.py: error: a link is NAME=NETNS:IFACE, got {s!r}", file=sys.stderr)
            return 2
        links.append((name, ns, iface))
    setns = _setns()
    fds = {ns: os.open(f"/run/netns/{ns}", os.O_RDONLY) for _, ns, _ in links}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    period = period_ms / 1e3

    def one(f) -> None:
        seen = {}
        for ns, fd in fds.items():
            setns(fd)
            seen[ns] = read_dev()
        t = time.time()
        tx = {name: seen[ns][iface][0] for name, ns, iface in links}
        pk = {name: seen[ns][iface][1] for name, ns, iface in links}
        f.write(json.dumps({"t": round(t, 6), "tx_bytes": tx, "tx_packets": pk}) + "\n")
        f.flush()                               # a killed sampler still leaves whole lines

    with open(out_path, "w") as f:
        # Readings on a fixed grid from the start: a late wake-up skips to the next slot
        # rather than crowding samples together.
        t0 = time.monotonic()
        i = 0
        while not stop:
            one(f)
            i += 1
            now = time.monotonic()
            i = max(i, int((now - t0) / period) + 1)
            delay = t0 + i * period - now
            if delay > 0 and not stop:
                try:
                    time.sleep(delay)           # a signal ends the sleep early (its handler runs)
                except InterruptedError:
                    pass
        one(f)                                  # the totals at the end, for the last interval
    return 0


def load(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]



MBIT = 1e6 / 8          # bytes/s in one Mbit/s


def link_series(jsonl: str | Path, path: str | Path, *, t_from: float | None = None, t_to: float | None = None,
                title: str | None = None) -> None:
    """Each link's TX rate (Mbit/s) between consecutive samples of a cluster's
    ``linkstats.jsonl`` (ddp_fnn/cluster/linkstats.py), against seconds since the first
    sample: the nodes' eth0 in one panel, the leaf uplinks (both directions) in the
    other when there are any. ``t_from``/``t_to`` cut a window (seconds). ValueError
    when matplotlib is missing, the file has fewer than two samples, or the PNG cannot
    be written."""
    from ddp_fnn.core import figures     # only when plotting: the sampler imports nothing of the package

    plt = figures.pyplot(no_plot_option=False)
    samples = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if len(samples) < 2:
        raise ValueError(f"{jsonl}: fewer than two samples")
    t0 = samples[0]["t"]
    names = list(samples[0]["tx_bytes"])
    xs, rates = [], {n: [] for n in names}
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        mid = (a["t"] + b["t"]) / 2 - t0
        if dt <= 0 or (t_from is not None and mid < t_from) or (t_to is not None and mid > t_to):
            continue
        xs.append(mid)
        for n in names:
            rates[n].append((b["tx_bytes"][n] - a["tx_bytes"][n]) / dt / MBIT)
    if not xs:
        raise ValueError(f"{jsonl}: no samples in the window")
    nodes = [n for n in names if not n.startswith("leaf")]
    uplinks = [n for n in names if n.startswith("leaf")]
    panels = [("node links (eth0 TX)", nodes)] + ([("leaf uplinks (up: leaf to spine, down: spine to leaf)",
                                                   uplinks)] if uplinks else [])
    period_ms = 1e3 * (samples[-1]["t"] - t0) / (len(samples) - 1)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(11, 2.6 + 2.4 * len(panels)), squeeze=False)
    for ax, (label, group) in zip(axes[:, 0], panels):
        for n in group:
            ax.step(xs, rates[n], where="mid", lw=0.9, label=n)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("TX Mbit/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=min(4, len(group)))
    axes[-1, 0].set_xlabel(f"seconds since the first sample (one sample every {period_ms:.0f} ms)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    figures.save(plt, fig, path, 110, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="linkstats", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="sample TX counters (netns-cluster.sh runs this)")
    s.add_argument("out")
    s.add_argument("period_ms", type=float)
    s.add_argument("links", nargs="+", metavar="NAME=NETNS:IFACE")
    q = sub.add_parser("plot", help="draw a linkstats.jsonl as TX rate per link against time")
    q.add_argument("jsonl")
    q.add_argument("png")
    q.add_argument("--from", dest="t_from", type=float, default=None, help="seconds after the first sample")
    q.add_argument("--to", dest="t_to", type=float, default=None, help="seconds after the first sample")
    q.add_argument("--title", default=None)
    a = p.parse_args(argv)
    if a.cmd == "sample":
        if not a.period_ms > 0:
            print("linkstats.py: error: the period must be > 0 ms", file=sys.stderr)
            return 2
        return sample(a.out, a.period_ms, a.links)

    try:
        link_series(a.jsonl, a.png, t_from=a.t_from, t_to=a.t_to, title=a.title)
    except ValueError as e:
        print(f"linkstats: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
