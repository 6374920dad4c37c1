"""`ddp-fnn estimate`: the cost model asked one question from the command line's
options (the CLI parses them; this module checks them, with ConfigErrors naming the
option, and answers in lines of text or one JSON document).

Two models: the alpha-beta one (netmodel.py: N ranks, one latency alpha, one bus
bandwidth beta, from --link-rate / --latency-us or a `ddp-fnn bench --json` fit), and,
with --topology FILE, the fabric one (topology.py: servers, NICs, leaf-spine, link by
link). Compute time comes from --compute-ms or a train summary.json.
"""

from __future__ import annotations

import json

from ddp_fnn.config import parse_layers
from ddp_fnn.core import fileio, units
from ddp_fnn.core.errors import ConfigError
from ddp_fnn.perfmodel import nccl, netmodel, plots, predict, topology


def run(*, layers, world_size, link_rate, latency_us, bench_json, compute_ms, summary_file, backward_fraction,
        bucket_mb, compression, algorithm, topology_file, channels, sweep_spec, plot_file, as_json) -> list[str]:
    """The answer's lines (``as_json``: one JSON document); ConfigError for a bad option."""
    out: list[str] = []
    widths = list(parse_layers(layers))
    if compression not in netmodel.COMPRESSION_BYTES:
        raise ConfigError(f"--compression {compression}: the cost model has no PowerSGD (its payload depends on "
                          f"the rank and on the gradients); one of {', '.join(netmodel.COMPRESSION_BYTES)}")
    sweep_name, sweep_values = None, []
    if sweep_spec is not None:
        try:
            sweep_name, sweep_values = netmodel.parse_sweep(sweep_spec)
        except ValueError as e:
            raise ConfigError(f"--sweep: {e}") from None
    if plot_file is not None and sweep_name is None:
        raise ConfigError("--plot needs --sweep (it draws the sweep's table)")
    if topology_file is not None:
        return on_topology(topology_file, widths, algorithm, channels, compute_ms, summary_file,
                           backward_fraction, bucket_mb, compression, as_json,
                           given=dict(world_size=world_size, link_rate=link_rate, latency_us=latency_us,
                                      bench_json=bench_json, sweep=sweep_spec))
    if algorithm == "hierarchical":
        raise ConfigError("--algorithm hierarchical needs --topology FILE (it is defined by the servers)")
    if channels is not None:
        raise ConfigError(f"--channels {channels} needs --topology FILE")

    # alpha and beta: explicit options, else the bench JSON, else alpha's default.
    alpha_s, beta, alpha_src, beta_src = None, None, "", ""
    if bench_json is not None:
        net = predict.read_bench_json(bench_json)
        # The fit's alpha is the whole all-reduce's latency at the bench's N, paid in the
        # measured backend's steps, not --algorithm's (predict.alpha_per_step).
        alpha_s, beta = predict.alpha_per_step(net), net["beta_bytes_per_second"]
        alpha_src = f" (bench: {net['alpha_s'] * 1e6:.1f} us per all-reduce at N={net['world_size']})"
        beta_src = f" (bench, N={net['world_size']})"
    if link_rate is not None:
        try:
            beta = units.parse_rate(link_rate)
        except ValueError as e:
            raise ConfigError(f"--link-rate: {e}") from None
        beta_src = f" (--link-rate {link_rate})"
    if latency_us is not None:
        if not (latency_us >= 0 and latency_us < float("inf")):
            raise ConfigError(f"--latency-us must be >= 0, got {latency_us}")
        alpha_s, alpha_src = latency_us * 1e-6, ""
    if alpha_s is None:
        alpha_s, alpha_src = 5e-6, " (default)"
    if beta is None and sweep_name != "link-rate":
        raise ConfigError("no bandwidth: give --link-rate (e.g. 100gbit) or --bench-json FILE")

    compute_s = compute_time_s(compute_ms, summary_file, required=sweep_name != "compute-ms")
    if world_size is None and sweep_name != "world-size":
        raise ConfigError("--world-size is required (or sweep it: --sweep world-size=2,8,64)")
    if world_size is not None and world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")

    kwargs = dict(world_size=world_size if world_size is not None else 1, alpha_s=alpha_s, beta_bytes_per_second=beta or 1.0,
                  compute_time_s=compute_s, bucket_mb=bucket_mb, compression=compression,
                  algorithm=algorithm, backward_fraction=backward_fraction)
    try:
        if sweep_name is None:
            est = netmodel.estimate_step(widths, **kwargs)
        else:
            rows = netmodel.sweep(sweep_name, sweep_values, widths, **kwargs)
    except ValueError as e:
        raise ConfigError(_option_message(str(e))) from None

    if sweep_name is None:
        if as_json:
            out.append(fileio.dumps(est.to_dict(), indent=2))
        else:
            out += netmodel.format_estimate(est, alpha_src, beta_src)
        return out
    if plot_file is not None:
        try:
            plots.estimate_sweep(plot_file, sweep_name, sweep_values, rows)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if as_json:
        out.append(fileio.dumps({"sweep": sweep_name, "values": sweep_values,
                               "estimates": [r.to_dict() for r in rows]}, indent=2))
    else:
        out += netmodel.format_sweep(sweep_name, sweep_values, rows)
        if plot_file is not None:
            out.append(f"wrote {plot_file}")
    return out


def compute_time_s(compute_ms, summary_file, required: bool) -> float:
    """One step's compute time: --compute-ms, else a train summary.json's mean step less its
    mean exposed communication (both means over the same steps: the p50 less a mean can
    go below zero when the link sets nearly the whole step)."""
    if compute_ms is not None:
        return compute_ms / 1e3
    if summary_file is not None:
        summary = _read_json(summary_file, "--summary")
        try:
            return max(0.0, float(summary["step_time_mean_s"]) - float(summary["exposed_comm_time_per_step_s"]))
        except KeyError as e:
            raise ConfigError(f"--summary {summary_file}: no key {e} (is it a train summary.json?)") from None
        except (TypeError, ValueError):
            raise ConfigError(f"--summary {summary_file}: step_time_mean_s and exposed_comm_time_per_step_s "
                            f"must be numbers") from None
    if required:
        raise ConfigError("no compute time: give --compute-ms MS or --summary summary.json")
    return 0.0


def on_topology(path, widths, algorithm, channels, compute_ms, summary_file, backward_fraction,
                bucket_mb, compression, as_json, given: dict) -> list[str]:
    """``estimate --topology``: the fabric sets N and every link (topology.py)."""

    for name, value in given.items():
        if value is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value}: not with --topology (the topology file sets the ranks and links)")
    if algorithm not in topology.ALGORITHMS:
        raise ConfigError(f"--algorithm {algorithm}: with --topology, one of {', '.join(topology.ALGORITHMS)}")
    if channels is not None and channels < 1:
        raise ConfigError(f"--channels must be >= 1, got {channels}")
    compute_s = compute_time_s(compute_ms, summary_file, required=True)
    try:
        topo = topology.load(path)
        est = topology.estimate(topo, widths, compute_s=compute_s, bucket_mb=bucket_mb, compression=compression,
                                algorithm=algorithm, channels=channels, backward_fraction=backward_fraction)
    except ValueError as e:
        raise ConfigError(_option_message(str(e))) from None
    with_nccl = topo.intra_kind != "loopback" and topo.world_size > 1
    if as_json:
        doc = est.to_dict()
        if with_nccl:
            doc["nccl"] = {"release": nccl.RELEASE, "backend": "nccl",
                           "buckets": nccl_bucket_rows(topo, widths, bucket_mb)}
        return [fileio.dumps(fileio.clean(doc), indent=2)]
    lines = topology.format_estimate(est)
    if with_nccl:
        lines += nccl_buckets(topo, widths, bucket_mb)
    return lines


def nccl_bucket_rows(topo, widths, bucket_mb) -> list[dict]:
    """Per distinct DDP bucket size, what NCCL would run (perfmodel/nccl.py: NCCL's tuner picks
    the algorithm and protocol, its channel rule the channels; the pipeline model the time) and
    what bounds it: latency (latency and pipeline fill are at least half the time), bandwidth
    (a protocol's cap, not a link) or the link (nvlink, nic, pcie)."""
    hw = nccl.hardware(topo)
    layout = netmodel.bucket_layout(widths, bucket_mb)
    rows = []
    for size in sorted({b.nbytes for b in layout}):
        c = nccl.call(hw, size)
        rows.append({"bytes": size, "buckets": sum(1 for b in layout if b.nbytes == size),
                     "algorithm": nccl.NCCL_NAMES[c.algorithm], "protocol": c.protocol, "channels": c.channels,
                     "chunk_bytes": c.chunk_bytes, "time_s": c.time_s, "latency_s": c.latency_s,
                     "busbw_bytes_per_second": c.bus_bw, "bound": c.bound})
    return rows


def nccl_buckets(topo, widths, bucket_mb) -> list[str]:
    """Per DDP bucket, what NCCL would run (``nccl_bucket_rows``: the NCCL backend's model; the
    fabric lines above are the link-by-link map, Gloo keeps its alpha-beta)."""
    out = [f"nccl         per bucket, NCCL's choice ({nccl.RELEASE}; NCCL backend):"]
    for r in nccl_bucket_rows(topo, widths, bucket_mb):
        out.append(f"             {units.format_bytes(r['bytes'])} (x{r['buckets']}): {r['algorithm']}/{r['protocol']}, "
                   f"{r['channels']} channel(s), {units.format_seconds(r['time_s'])}, busbw "
                   f"{units.format_rate(r['busbw_bytes_per_second'])}, {r['bound']}-bound")
    return out


def _option_message(message: str) -> str:
    """netmodel's ValueErrors name the quantity; say which option carries it."""
    for word, option in (("world size", "--world-size"), ("latency", "--latency-us"),
                         ("compute time", "--compute-ms"), ("backward fraction", "--backward-fraction"),
                         ("bucket_mb", "--bucket-mb"), ("layers", "--layers")):
        if message.startswith(word):
            return f"{option}: {message}"
    return message


def _read_json(path: str, option: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{option} {path}: expected a JSON object")
    return data
