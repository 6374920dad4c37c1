"""The cost model's prediction next to a training run's measurement.

`ddp-fnn train` needs the network's alpha (latency) and beta (bus bandwidth): from
``--bench-json`` (a `ddp-fnn bench --json` file), else from a quick probe of the job's
own fabric before the first step (probe.probe: a few fp32 all-reduces up to the
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

from ddp_fnn.perfmodel import netmodel
from ddp_fnn.config import ConfigError, ParallelConfig, PredictConfig


def read_bench_json(path: Path) -> dict:
    """alpha and beta from a `ddp-fnn bench --json` file, or ConfigError naming the file
    and the problem: the one reader of that file (train's --bench-json, estimate's).
    ``alpha_s`` is as fitted, the whole all-reduce's latency at ``world_size``;
    ``alpha_per_step`` turns it into the model's alpha."""
    try:
        data = json.loads(Path(path).read_text())
        n, alpha, beta = int(data["world_size"]), data["alpha_s"], data["beta_bytes_per_second"]
    except OSError as e:
        raise ConfigError(f"--bench-json {path}: cannot read: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--bench-json {path}: not a `ddp-fnn bench --json` file ({e})") from None
    if alpha is None or beta is None or n < 2:
        raise ConfigError(f"--bench-json {path}: it holds no alpha-beta fit (world size {n}); "
                          f"run the bench with 2 or more ranks")
    return {"source": f"bench-json {path}", "alpha_s": float(alpha), "beta_bytes_per_second": float(beta),
            "world_size": n}


def network(cfg: PredictConfig, layers, bucket_mb: float, ctx, bench_data: dict | None) -> dict | None:
    """The alpha-beta to predict with: the bench file's, or a probe's when --probe asks for
    one (None otherwise, and at world size 1). Every rank calls it: the probe is collective. The probe always
    fits something; where least squares could not, it says so in one line (rank 0) and
    ``method`` names the fallback."""
    if bench_data is not None:
        return bench_data
    if not cfg.probe or ctx.world_size < 2:
        return None
    # Imported here: probe needs torch, and `ddp-fnn estimate` reads bench files through
    # this module without it.
    from ddp_fnn.perfmodel import probe

    largest = max(b.nbytes for b in netmodel.bucket_layout(layers, bucket_mb))
    found = probe.probe(ctx, largest, rounds=cfg.probe_rounds)
    if found.get("method") != "least-squares" and ctx.is_master:
        print(f"ddp-fnn: note: the probe's least-squares fit failed ({found['fallback_because']}); "
              f"alpha and beta from its {found['method']} fallback (probe.probe)", file=sys.stderr)
    return {"source": "probe", **found}


def probe_traffic(net: dict | None) -> dict | None:
    """What the probe put on the wire (summary.json's ``probe``), or None without one."""
    if not net or net.get("source") != "probe":
        return None
    return {k: net[k] for k in ("payload_bytes", "wire_bytes", "calls", "calls_per_size", "sizes", "attempt_sizes",
                                "method")}


def prediction(layers, par: ParallelConfig, world_size: int, net: dict | None, figures: dict,
               cfg: PredictConfig | None = None) -> dict:
    """summary.json's predicted_* keys (None where there is nothing to predict with).

    The model replays this run's measured bucket schedule (``bucket_schedule``: when each
    bucket was handed over, before the end of backward) with all-reduces of alpha + S/beta
    queued as the backend runs them (Gloo two at a time, netmodel.BACKEND_CONCURRENCY);
    where the schedule does not fit the model's bucket layout it falls back to the
    model's own (``prediction.schedule`` says which). Predicted exposed communication is
    this rank's measured wait for peers plus the model's exposed transfer; the predicted
    step is compute plus that transfer (compute includes the wait: it is the slowest
    rank's compute)."""
    keys = ("predicted_comm_time_per_step_s", "predicted_exposed_comm_time_per_step_s", "predicted_step_time_s")
    empty = dict.fromkeys(keys) | {"prediction": None}
    if net is None:
        asked = cfg is None or cfg.probe or cfg.bench_json is not None
        why = ("world size 1: no network to predict" if world_size < 2 and asked
               else "not asked for: no --probe or --bench-json (the first step started at once)")
        return empty | {"prediction_skipped": why}
    if "step_time_mean_s" not in figures:
        return empty | {"prediction_skipped": "no step was timed"}
    if par.compression == "powersgd":
        return empty | {"prediction_skipped": "--compression powersgd: the model has no PowerSGD"}
    wait = figures.get("wait_for_peers_per_step_s") or 0.0
    est, leads = _estimate(list(layers), par.sync, par.bucket_mb, par.compression, figures.get("backend"),
                           net, figures, world_size)
    return {
        "prediction_skipped": None,
        "predicted_comm_time_per_step_s": est.comm_time_per_step_s,
        "predicted_exposed_comm_time_per_step_s": wait + est.exposed_comm_time_per_step_s,
        "predicted_step_time_s": est.step_time_s,
        "prediction": {k: v for k, v in net.items() if k != "times_s"}
                      | {"compute_time_per_step_s": est.compute_time_per_step_s, "wait_for_peers_per_step_s": wait,
                         "schedule": "linear" if leads is None else "measured",
                         "concurrency": netmodel.BACKEND_CONCURRENCY.get(figures.get("backend"), 1)},
    }


def _estimate(layers: list[int], sync: str, bucket_mb: float, compression: str, backend: str | None, net: dict,
              figures: dict, world_size: int, compute_scale: float = 1.0,
              beta_bytes_per_second: float | None = None) -> tuple[netmodel.StepEstimate, list[float] | None]:
    """The model at ``world_size`` from a run's figures and network fit (the one place
    both the run's own prediction and ``from_run`` build it)."""
    # --sync allreduce is one bucket of everything, launched when backward ends.
    cap = bucket_mb if sync == "ddp" else netmodel.parameter_bytes(layers) / 2 ** 20 + 1
    leads = measured_leads(layers, cap, figures.get("bucket_schedule"))
    est = netmodel.estimate_step(
        layers, world_size=world_size, alpha_s=alpha_per_step(net),
        beta_bytes_per_second=beta_bytes_per_second or net["beta_bytes_per_second"],
        compute_time_s=compute_time(figures) * compute_scale, bucket_mb=cap, compression=compression,
        bucket_leads_s=None if leads is None else [x * compute_scale for x in leads],
        concurrency=netmodel.BACKEND_CONCURRENCY.get(backend, 1))
    return est, leads


MEASURED_ALGORITHM = "ring"
"""The all-reduce algorithm a fit's latency was paid in: Gloo's all-reduce is a ring at
every world size, and the model takes NCCL's to be one too (docs/metrics.md: NCCL picks
its tree only for some sizes and N). The fitted latency is the measured backend's, so
it is divided by this algorithm's step count, whatever algorithm the model then
projects to (estimate --algorithm)."""


def alpha_per_step(net: dict) -> float:
    """The fit's alpha is a whole all-reduce's latency at the fit's N; the model wants the
    latency of one message step (a ring pays 2(N-1) of them). ``net`` is a probe's or
    ``read_bench_json``'s: ``alpha_s`` and ``world_size``."""
    return net["alpha_s"] / netmodel.latency_steps(net["world_size"], MEASURED_ALGORITHM)


def compute_time(figures: dict) -> float:
    """A run's compute per step: the step less the exposed communication that was the
    network's (exposed minus the wait for a slower peer, which is compute on the critical
    path: the slowest rank's)."""
    wait = figures.get("wait_for_peers_per_step_s") or 0.0
    network_exposed = max(0.0, figures["exposed_comm_time_per_step_s"] - wait)
    return max(0.0, figures["step_time_mean_s"] - network_exposed)


def measured_leads(layers, bucket_mb: float | None, schedule: list[dict] | None) -> list[float] | None:
    """The run's bucket leads when its schedule has the model's layout (same bucket count
    and sizes, fp32 or compressed), else None (the model's linear schedule)."""
    if not schedule:
        return None
    layout = netmodel.bucket_layout(layers, bucket_mb)
    if len(layout) != len(schedule):
        return None
    for b, m in zip(layout, schedule):
        if m["payload_bytes"] not in {b.numel * e for e in set(netmodel.COMPRESSION_BYTES.values())}:
            return None
    return [m["lead_s"] for m in schedule]


def from_run(summary: dict, *, world_size: int, beta_bytes_per_second: float | None = None,
             compute_scale: float = 1.0, compression: str | None = None) -> netmodel.StepEstimate:
    """Predict another setting from one measured run (its summary.json): the question "I
    measured at 2 nodes, what happens at 4, or at 64, or on a slower link?".

    Carried over from the run: its compute per step (``compute_time``) and its measured
    bucket schedule, both times ``compute_scale`` (1 on separate machines; more where the
    target's ranks share CPU cores, as the nodes of a one-machine simulation do), its
    backend, its probe's alpha per message step, and its bus bandwidth unless
    ``beta_bytes_per_second`` is given. The target's world size (and compression) set the
    all-reduce times. Raises ValueError when the run has no probe fit to carry over."""
    cfg, net = summary.get("config") or {}, summary.get("prediction")
    if not net or net.get("alpha_s") is None or not cfg:
        raise ValueError("the run has no alpha-beta fit (summary.json 'prediction'): it ran without a probe")
    if not compute_scale > 0:
        raise ValueError(f"compute_scale must be > 0, got {compute_scale}")
    est, _ = _estimate(list(cfg["layers"]), cfg.get("sync", "ddp"), cfg["bucket_mb"],
                       compression or cfg.get("compression", "none"), summary.get("backend"), net, summary,
                       world_size, compute_scale, beta_bytes_per_second)
    return est
