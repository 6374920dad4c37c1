"""The cost model's prediction next to a training run's measurement.

`ddp-fnn train` needs the network's alpha (latency) and beta (bus bandwidth): from
``--bench-json`` (a `ddp-fnn bench --json` file), else from a quick probe of the job's
own fabric before the first step (bench.probe: a few fp32 all-reduces up to the
largest gradient bucket or 1 MiB, interleaved over rounds, with one retry at larger
sizes where the line would be noise). With them and the run's measured compute time per step,
netmodel.estimate_step predicts the step's communication time and its exposed part,
which summary.json records beside the measured figures:

    predicted_comm_time_per_step_s          vs comm_time_per_step_s
    predicted_exposed_comm_time_per_step_s  vs exposed_comm_time_per_step_s

The compute time fed to the model is the measured step time less the exposed
communication that was the network's: exposed minus the time spent waiting for a slower
peer (peers.py). Waiting is compute on the critical path (the slowest rank's), not
network, so a straggler does not make the model think the link is slow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ddp_fnn import bench, netmodel
from ddp_fnn.config import ConfigError, TrainConfig


def read_bench_json(path: Path) -> dict:
    """alpha and beta from a bench JSON, or ConfigError naming the file and the problem."""
    try:
        data = json.loads(Path(path).read_text())
        n, alpha, beta = int(data["world_size"]), data["alpha_s"], data["beta_bytes_per_second"]
    except OSError as e:
        raise ConfigError(f"--bench-json {path}: cannot read: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--bench-json {path}: not a `ddp-fnn bench --json` file ({e})") from None
    if alpha is None or beta is None or n < 2:
        raise ConfigError(f"--bench-json {path}: it holds no alpha-beta fit (world size {n})")
    return {"source": f"bench-json {path}", "alpha_s": float(alpha), "beta_bytes_per_second": float(beta),
            "world_size": n}


def network(cfg: TrainConfig, ctx, bench_data: dict | None) -> dict | None:
    """The alpha-beta to predict with: the bench file's, or a probe's (None if --no-probe
    or world size 1). Every rank calls it: the probe is collective. The probe always
    fits something; where least squares could not, it says so in one line (rank 0) and
    ``method`` names the fallback."""
    if bench_data is not None:
        return bench_data
    if not cfg.probe or ctx.world_size < 2:
        return None
    largest = max(b.nbytes for b in netmodel.bucket_layout(cfg.layers, cfg.bucket_mb))
    found = bench.probe(ctx, largest)
    if found.get("method") != "least-squares" and ctx.is_master:
        print(f"ddp-fnn: note: the probe's least-squares fit failed ({found['fallback_because']}); "
              f"alpha and beta from its {found['method']} fallback (bench.probe)", file=sys.stderr)
    return {"source": "probe", **found}


def probe_traffic(net: dict | None) -> dict | None:
    """What the probe put on the wire (summary.json's ``probe``), or None without one."""
    if not net or net.get("source") != "probe":
        return None
    return {k: net[k] for k in ("payload_bytes", "wire_bytes", "calls", "calls_per_size", "sizes", "attempt_sizes",
                                "method")}


def prediction(cfg: TrainConfig, world_size: int, net: dict | None, figures: dict) -> dict:
    """summary.json's predicted_* keys (None where there is nothing to predict with)."""
    keys = ("predicted_comm_time_per_step_s", "predicted_exposed_comm_time_per_step_s", "predicted_step_time_s")
    empty = dict.fromkeys(keys) | {"prediction": None}
    if net is None or "step_time_mean_s" not in figures or cfg.compression == "powersgd":
        return empty
    # The fit's alpha is a whole all-reduce's latency at the fit's N; the model wants the
    # latency of one message step (a ring pays 2(N-1) of them).
    alpha_step = net["alpha_s"] / netmodel.latency_steps(net["world_size"], "ring")
    wait = figures.get("wait_for_peers_per_step_s") or 0.0
    network_exposed = max(0.0, figures["exposed_comm_time_per_step_s"] - wait)
    compute = max(0.0, figures["step_time_mean_s"] - network_exposed)
    # --sync allreduce is one bucket of everything, launched when backward ends.
    bucket_mb = cfg.bucket_mb if cfg.sync == "ddp" else netmodel.parameter_bytes(cfg.layers) / 2 ** 20 + 1
    est = netmodel.estimate_step(cfg.layers, world_size=world_size, alpha_s=alpha_step,
                                 beta_bytes_per_second=net["beta_bytes_per_second"], compute_time_s=compute,
                                 bucket_mb=bucket_mb, compression=cfg.compression)
    return {
        "predicted_comm_time_per_step_s": est.comm_time_per_step_s,
        "predicted_exposed_comm_time_per_step_s": est.exposed_comm_time_per_step_s,
        "predicted_step_time_s": est.step_time_s,
        "prediction": {k: v for k, v in net.items() if k != "times_s"} | {"compute_time_per_step_s": compute},
    }
