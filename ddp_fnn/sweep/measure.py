"""Reading one complete point: its measured columns (summary, step file, kernel counters),
the model's predictions beside them, and whether the link, the host or a fault set the pace."""

from __future__ import annotations

import statistics
from pathlib import Path

from ddp_fnn.core import fileio, units
from ddp_fnn.observe import stepfile
from ddp_fnn.perfmodel import netmodel
from ddp_fnn.perfmodel import predict
from ddp_fnn.sweep.grid import HEADER_BYTES, TCP_MSS_BYTES, Point, SweepConfig


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile by statistics' inclusive method (linear between order statistics),
    as metrics.Summary computes step_time_p95_s."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def measure(cfg: SweepConfig, p: Point, pdir: Path) -> dict:
    """The measured columns of a complete point."""
    summary = fileio.loads((pdir / "node0" / "summary.json").read_text())
    steps = stepfile.read(pdir / "node0" / "steps-rank0.jsonl")
    step_s = [s["step_s"] for s in steps[1:]] or [s["step_s"] for s in steps]
    ranks = summary.get("ranks") or [summary]
    tcp = [r.get("tcp") or {} for r in ranks]
    # Each namespace node has its own TCP counters; on loopback every rank reads the host's.
    tcp = tcp if cfg.launcher == "netns" else tcp[:1]
    retrans = sum(t.get("retransmitted_segments") or 0 for t in tcp)
    # Retransmission timeouts (each a stall of >= 200 ms); None for runs that predate them.
    timeouts = [t["timeouts"] for t in tcp if t.get("timeouts") is not None]
    probe = (summary.get("probe") or {}).get("wire_bytes") or 0
    # What each rank reports sending: its all-reduces, the probe, the replicas' set-up.
    reported = [(r.get("allreduce_wire_bytes_total") or 0) + probe + (r.get("setup_wire_bytes") or 0) for r in ranks]
    row = {
        "step_mean_s": summary["step_time_mean_s"], "step_p50_s": summary["step_time_p50_s"],
        "step_p99_s": quantile(step_s, 0.99),
        "comm_s": summary["comm_time_per_step_s"], "exposed_s": summary["exposed_comm_time_per_step_s"],
        "transfer_s": summary.get("transfer_per_step_s"), "wait_s": summary.get("wait_for_peers_per_step_s"),
        "compute_s": predict.compute_time(summary),
        "busbw_bytes_per_second": summary["busbw_bytes_per_second"],
        "payload_bytes_per_step": summary["allreduce_payload_bytes_per_step"],
        "wire_bytes_per_step": summary["allreduce_wire_bytes_per_step"],
        "buckets": len(summary.get("bucket_schedule") or []),
        "retransmits_per_step": retrans / max(1, summary["steps"]),
        "timeouts_per_step": sum(timeouts) / max(1, summary["steps"]) if timeouts else None,
        "reported_tx_bytes": max(reported),
    }
    net = summary.get("prediction") or {}
    row |= {"probe_method": net.get("method"), "alpha_s": net.get("alpha_s"),
            "beta_bytes_per_second": net.get("beta_bytes_per_second")}
    # The run's own prediction, by the model as it is now (the same as summary.json's
    # predicted_* when the job ran this code): a model change re-reads old points.
    if net.get("alpha_s") is not None:
        est = predict.from_run(summary, world_size=p.nodes)
        row |= {"pred_step_s": est.step_time_s, "pred_comm_s": est.comm_time_per_step_s,
                "pred_exposed_s": (row["wait_s"] or 0.0) + est.exposed_comm_time_per_step_s}
    # The best round trip of the clock-offset ping-pongs: an idle RTT for Mathis' formula.
    bounds = [o.get("bound_start_s") for o in summary.get("clock_offsets") or [] if o.get("bound_start_s")]
    row["rtt_s"] = 2 * max(bounds) if bounds else None
    netstats = pdir / "netstats.json"
    if netstats.is_file():
        ns = fileio.loads(netstats.read_text())
        # Node k runs rank k (c10d ranks the nodes by host name, node0, node1, ...).
        payload_tx = [n["tx_bytes"] - n["tx_packets"] * HEADER_BYTES for n in ns["nodes"]]
        row["kernel_tx_payload_bytes"] = max(payload_tx)
        # One worker a node: its eth0 carries what the rank reports. With several, a node's
        # eth0 carries part of each rank's bytes (the rest stays inside): nic_tx_error.
        row["tx_error"] = (max((t / w - 1 for t, w in zip(payload_tx, reported) if w), key=abs, default=None)
                           if cfg.gpus_per_node == 1 else None)
        row["tc_dropped_packets"] = sum((n.get("qdisc") or {}).get("dropped", 0)
                                        + (n.get("port_qdisc") or {}).get("dropped", 0) for n in ns["nodes"])
        row["loss_dropped_packets"] = sum(n.get("loss_dropped_packets") or 0 for n in ns["nodes"])
    if cfg.topology is not None and netstats.is_file():
        row |= fabric_columns(cfg, p, summary, ns)
    if p.loss_percent > 0 and row["rtt_s"]:
        link = units.parse_rate(p.link_rate) if p.link_rate else None
        row["mathis_busbw_bytes_per_second"] = netmodel.mathis_rate(TCP_MSS_BYTES, row["rtt_s"],
                                                                    p.loss_percent / 100, link)
    return row | {"_summary": summary}


PAYLOAD_SHARE = (1500 + 14 - HEADER_BYTES) / (1500 + 14)   # TCP payload of a tc (frame) rate at MTU 1500


def fabric_columns(cfg: SweepConfig, p: Point, summary: dict, ns: dict) -> dict:
    """--topology: each node's eth0 and each uplink's kernel TX payload against the
    fabric model's bytes on that link over the whole job (topology.job_link_bytes: the
    gradients by the point's algorithm, the probe's flat ring, DDP's start-up broadcast),
    the worst of each as an error; the step time by topology.estimate with every network
    rate at what its TCP payload gets (PAYLOAD_SHARE) and the rank's compute as the
    namespace checks take it (the mean step less the exposed communication: with several
    workers a node sharing the cores, a peer's lateness is theirs, not a straggler's);
    and how long the bottleneck link must be busy a step at its line rate
    (``bottleneck_busy_s``), which ``bound`` holds against the measured comm time."""
    from ddp_fnn.perfmodel import topology

    algorithm = "hierarchical" if p.all_reduce == "hierarchical" else "ring"
    topo = cfg.fabric(p)
    probe = summary.get("probe") or {}
    model = topology.job_link_bytes(topo, summary["allreduce_payload_bytes_total"], algorithm,
                                    probe.get("payload_bytes") or 0, summary["gradient_bytes"])
    # (link, kernel TX payload, model bytes) for every node's eth0 and both ends of every uplink
    seen = [(topology.nic_link(k, 0, "tx"), n["tx_bytes"] - n["tx_packets"] * HEADER_BYTES)
            for k, n in enumerate(ns["nodes"])]
    for u in ns.get("uplinks") or []:
        j = u["leaf"]
        seen += [(f"leaf{j}.up", u["tx_bytes"] - u["tx_packets"] * HEADER_BYTES),
                 (f"leaf{j}.down", u["spine_tx_bytes"] - u["spine_tx_packets"] * HEADER_BYTES)]
    links = [(name, sent, model.get(name, 0.0)) for name, sent in seen]
    node_err = [sent / m - 1 for name, sent, m in links if m and ".nic" in name]
    up_err = [sent / m - 1 for name, sent, m in links if m and name.startswith("leaf")]
    compute_s = max(0.0, summary["step_time_mean_s"] - summary["exposed_comm_time_per_step_s"])
    est = topology.estimate(cfg.fabric(p, PAYLOAD_SHARE), cfg.layers, compute_s=compute_s, bucket_mb=p.bucket_mb,
                            compression=p.compression, algorithm=algorithm)
    line = topology.estimate(topo, cfg.layers, compute_s=compute_s, bucket_mb=p.bucket_mb,
                             compression=p.compression, algorithm=algorithm)
    return {"model_nic_tx_bytes": max((v for k, v in model.items() if k.endswith(".tx") and ".nic" in k), default=None),
            "nic_tx_error": max(node_err, key=abs, default=None),
            "model_uplink_bytes": max((v for k, v in model.items() if k.startswith("leaf")), default=None),
            "uplink_tx_error": max(up_err, key=abs, default=None),
            "topo_step_s": est.step_time_s, "topo_step_error": _err(est.step_time_s, summary["step_time_mean_s"]),
            "bottleneck_link": line.bottleneck_link, "bottleneck_busy_s": line.bottleneck_busy_s,
            "links": " ".join(f"{name}={sent}/{m:.0f}" for name, sent, m in links)}


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------

COLUMNS = (
    "point", "status", "nodes", "link_rate", "bucket_mb", "buckets", "compression", "loss_percent",
    "queue_limit_bytes", "steps",
    "step_mean_s", "step_p50_s", "step_p99_s", "comm_s", "exposed_s", "transfer_s", "wait_s", "compute_s",
    "busbw_bytes_per_second", "payload_bytes_per_step", "wire_bytes_per_step",
    "probe_method", "alpha_s", "beta_bytes_per_second",
    "pred_step_s", "pred_comm_s", "pred_exposed_s", "step_error", "exposed_error",
    "cal_from", "compute_scale", "cal_step_s", "cal_exposed_s", "cal_step_error", "cal_exposed_error",
    "retransmits_per_step", "timeouts_per_step", "tc_dropped_packets", "loss_dropped_packets",
    "rtt_s", "mathis_busbw_bytes_per_second",
    "reported_tx_bytes", "kernel_tx_payload_bytes", "tx_error",
    "line_rate_bytes_per_second", "wire_share", "bound",
    "all_reduce", "gpus_per_node", "model_nic_tx_bytes", "nic_tx_error", "model_uplink_bytes", "uplink_tx_error",
    "topo_step_s", "topo_step_error", "bottleneck_link", "bottleneck_busy_s",
    "links",        # --topology: LINK=KERNEL/MODEL bytes over the job, every NIC (eth0) and uplink direction
)

# What sets a point's pace. A link-bound point's all-reduces run its shaped link near the
# configured rate; on one machine's veth pairs and bridge, a fast link instead measures the
# cores forwarding the frames (2 shared cores here reach ~100-200 Mbit/s of busbw with
# several nodes), and the model, which knows the link and not the cores, is then asked the
# wrong question. The line between them: busbw (payload / comm time x 2(N-1)/N, what the
# ring asks of every link) at LINK_BOUND_SHARE of the rate or more. A point whose busbw
# falls below it with packet loss or a shallow queue configured is "fault": TCP backing
# off is the network's doing, but it cannot be told apart from the host here.
LINK_BOUND_SHARE = 0.7


def bound(link_rate: str | None, busbw: float | None, faulted: bool, busy_s: float | None = None,
          comm_s: float | None = None) -> tuple[float | None, float | None, str]:
    """(line rate in bytes/s, share, "link" | "host" | "fault" | "unshaped"). The share is
    busbw / line rate -- with one worker a node and one tier, the ring's every link busy
    over the comm time -- or, on a --topology fabric, the bottleneck link's busy time at
    line rate (``busy_s``) over the measured comm time: the same question, asked of the
    link that should set the pace."""
    if not link_rate or link_rate == "unshaped":
        return None, None, "unshaped"
    rate = units.parse_rate(link_rate)
    if busy_s is not None:
        share = busy_s / comm_s if comm_s else None
    else:
        share = busbw / rate if busbw is not None else None
    if share is not None and share >= LINK_BOUND_SHARE:
        return rate, share, "link"
    return rate, share, "fault" if faulted else "host"


def _err(pred, meas):
    return (pred - meas) / meas if pred is not None and meas else None


def build_rows(cfg: SweepConfig, results: dict[Point, tuple[bool, Path]]) -> list[dict]:
    measured = {p: measure(cfg, p, d) for p, (ok, d) in results.items() if ok}
    rows = []
    for p, (ok, _d) in results.items():
        row = {"point": p.name, "status": "ok" if ok else "failed", "nodes": p.nodes, "link_rate": p.link_rate or "unshaped",
               "bucket_mb": p.bucket_mb, "compression": p.compression, "loss_percent": p.loss_percent,
               "queue_limit_bytes": p.queue_limit_bytes, "steps": cfg.steps, "all_reduce": p.all_reduce,
               "gpus_per_node": cfg.gpus_per_node}
        m = measured.get(p)
        if m is not None:
            row |= {k: v for k, v in m.items() if not k.startswith("_")}
            row["line_rate_bytes_per_second"], row["wire_share"], row["bound"] = bound(
                p.link_rate, row.get("busbw_bytes_per_second"), bool(p.loss_percent or p.queue_limit_bytes),
                row.get("bottleneck_busy_s"), row.get("comm_s"))
            row["step_error"] = _err(row["pred_step_s"], row["step_mean_s"])
            row["exposed_error"] = _err(row["pred_exposed_s"], row["exposed_s"])
            base = p.sibling(cfg.calibrate_on) if cfg.calibrate_on is not None else None
            if base is not None and base != p and base in measured:
                scale = cfg.compute_scale(p.nodes, base.nodes)
                try:
                    est = predict.from_run(measured[base]["_summary"], world_size=p.nodes, compute_scale=scale)
                except ValueError:
                    est = None
                if est is not None:
                    row |= {"cal_from": base.name, "compute_scale": scale, "cal_step_s": est.step_time_s,
                            "cal_exposed_s": est.exposed_comm_time_per_step_s,
                            "cal_step_error": _err(est.step_time_s, row["step_mean_s"]),
                            "cal_exposed_error": _err(est.exposed_comm_time_per_step_s, row["exposed_s"])}
        rows.append({c: row.get(c) for c in COLUMNS})
    return rows
