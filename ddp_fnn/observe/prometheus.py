"""Per-step records turned into Prometheus metrics and summary.json figures.

The only module that imports prometheus_client. Every metric carries ``rank`` (the
global rank); names carry base units and Prometheus' type suffixes. The names are a
contract: deploy/prometheus rules, the Grafana dashboard and users' queries use them.

Every figure comes from ``observe.StepRecord``s; the definitions (comm time, comm span,
exposed communication, sync tail) are in observe.py and docs/metrics.md. Here:

* wire bytes: bytes this rank sends, from the algorithm's formula. Gloo and NCCL's ring
  all-reduce send 2(N-1)/N x payload per rank (reduce-scatter then all-gather, each
  N-1 steps of payload/N); see docs/metrics.md and ddp_fnn/perfmodel/netmodel.py.
* algbw = payload / comm time; busbw = algbw x 2(N-1)/N (nccl-tests' definitions).
"""

from __future__ import annotations

import errno
import statistics
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.exposition import push_to_gateway

from ddp_fnn.core.errors import ConfigError
from ddp_fnn.core.wire import busbw_factor, ring_wire_bytes
from ddp_fnn.observe import PHASES, StepRecord

# 100 us .. 10 s: an FNN step on CPU is often well under the client's default 5 ms floor.
TIME_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Summary:
    """Running per-step figures for summary.json and the end-of-run table."""
    world_size: int
    step_s: list[float] = field(default_factory=list)
    exposed_s: list[float] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    span_s: list[float] = field(default_factory=list)
    tail_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    transfer_s: list[float] = field(default_factory=list)
    last_ready: int = 0                  # steps in which this rank was the last one ready
    rank: int | None = None
    calls: list[int] = field(default_factory=list)
    payload: list[int] = field(default_factory=list)
    schedule: list[tuple] = field(default_factory=list)   # per step: (payload, lead, duration) per bucket
    payload_detailed: list[int] = field(default_factory=list)   # payload of the steps in comm_s
    samples: int = 0
    # Bytes a rank sends to all-reduce a payload (Synchroniser.wire_bytes); None: a ring's.
    wire_bytes: object = None

    def _wire(self, payload: float) -> float:
        return ring_wire_bytes(payload, self.world_size) if self.wire_bytes is None else self.wire_bytes(payload)

    def add(self, rec: StepRecord) -> None:
        self.step_s.append(rec.step_s)
        self.exposed_s.append(rec.exposed_s)
        if rec.detailed:
            # Completions are known on detailed steps only (--bucket-detail-every): the
            # union of the buckets' intervals, the tail, and the bucket schedule.
            self.comm_s.append(rec.comm_s)
            self.span_s.append(rec.comm_span_s)
            self.tail_s.append(rec.tail_s)
            self.payload_detailed.append(rec.payload_bytes)
            ready = rec.ready_s if rec.ready_s is not None else 0.0
            self.schedule.append(tuple((c.payload_bytes, max(0.0, ready - c.start_s), c.duration_s)
                                       for c in rec.collectives))
        if rec.wait_s is not None:
            self.wait_s.append(rec.wait_s)
            self.transfer_s.append(rec.transfer_s)
            self.last_ready += rec.last_ready_rank == self.rank
        self.calls.append(rec.calls)
        self.payload.append(rec.payload_bytes)
        self.samples += rec.samples

    def figures(self) -> dict:
        """Per-step means. The first step (DDP's bucket rebuild, allocator warm-up) is left
        out of the timing figures when there are more steps; byte counts use every step.
        Comm time, its span, the tail, algbw and busbw are means over the steps with bucket
        detail (all of them unless --bucket-detail-every > 1), step 1 left out alike."""
        if not self.step_s:
            return {}
        t = slice(1, None) if len(self.step_s) > 1 else slice(None)
        d = slice(1, None) if len(self.comm_s) > 1 else slice(None)   # detailed steps (step 1 first)
        steps, comm, payload = self.step_s[t], self.comm_s[d], self.payload_detailed[d]
        q = statistics.quantiles(steps, n=20, method="inclusive") if len(steps) > 1 else [steps[0]] * 19
        comm_total = sum(comm)
        algbw = sum(payload) / comm_total if comm_total > 0 else 0.0
        n_steps = len(self.step_s)
        return {
            "step_time_p50_s": statistics.median(steps),
            "step_time_p95_s": q[18],
            "step_time_mean_s": statistics.fmean(steps),
            "allreduce_calls_per_step": sum(self.calls) / n_steps,
            "allreduce_payload_bytes_per_step": sum(self.payload) / n_steps,
            "allreduce_wire_bytes_per_step": self._wire(sum(self.payload)) / n_steps,
            "allreduce_payload_bytes_total": sum(self.payload),
            "allreduce_wire_bytes_total": self._wire(sum(self.payload)),
            "comm_time_per_step_s": statistics.fmean(comm),
            "comm_span_per_step_s": statistics.fmean(self.span_s[d]),
            "exposed_comm_time_per_step_s": statistics.fmean(self.exposed_s[t]),
            "sync_tail_per_step_s": statistics.fmean(self.tail_s[d]),
            "detailed_steps": len(self.comm_s),
            "wait_for_peers_per_step_s": statistics.fmean(self.wait_s[t]) if self.wait_s[t] else None,
            "transfer_per_step_s": statistics.fmean(self.transfer_s[t]) if self.transfer_s[t] else None,
            "last_ready_steps": self.last_ready,
            "last_ready_share": self.last_ready / len(self.wait_s) if self.wait_s else None,
            "algbw_bytes_per_second": algbw,
            "busbw_bytes_per_second": algbw * busbw_factor(self.world_size),
            "bucket_schedule": self.bucket_schedule(),
        }

    def bucket_schedule(self) -> list[dict]:
        """Each bucket's mean hand-over time before the step's ``ready`` (its lead) and mean
        all-reduce time, in all-reduce order, over the steps after the first (DDP's first
        step runs one bucket of everything, then rebuilds them). The measured schedule that
        netmodel.estimate_step replays (``bucket_leads_s``)."""
        steps = self.schedule[1:] if len(self.schedule) > 1 else self.schedule
        if not steps or not steps[-1]:
            return []
        steps = [s for s in steps if len(s) == len(steps[-1])]   # the layout after the rebuild
        return [{"bucket": k, "payload_bytes": steps[-1][k][0],
                 "lead_s": statistics.fmean(s[k][1] for s in steps),
                 "duration_s": statistics.fmean(s[k][2] for s in steps)}
                for k in range(len(steps[-1]))]


class Metrics:
    """This rank's Prometheus metrics, in their own registry."""

    def __init__(self, rank: int, world_size: int, run_info: dict[str, str],
                 registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rank = str(rank)
        self.world_size = world_size
        self._wire_bytes = None                 # set_wire_bytes; None: a ring's 2(N-1)/N x payload
        r, reg = ["rank"], self.registry
        self.steps = Counter("ddp_fnn_steps", "Optimizer steps completed.", r, registry=reg)
        self.samples = Counter("ddp_fnn_samples", "Training samples this rank processed.", r, registry=reg)
        self.step_duration = Histogram("ddp_fnn_step_duration_seconds", "Wall time of one optimizer step.",
                                       r, buckets=TIME_BUCKETS, registry=reg)
        self.phase_duration = Histogram("ddp_fnn_phase_duration_seconds",
                                        "Time of each phase of a step (backward is compute only; the wait "
                                        "for gradient sync is ddp_fnn_sync_exposed_duration_seconds).",
                                        r + ["phase"], buckets=TIME_BUCKETS, registry=reg)
        self.exposed = Histogram("ddp_fnn_sync_exposed_duration_seconds",
                                 "Exposed communication: the part of a step's all-reduce time after this rank's "
                                 "gradients were all handed over (never more than the comm time).",
                                 r, buckets=TIME_BUCKETS, registry=reg)
        self.tail = Histogram("ddp_fnn_sync_tail_duration_seconds",
                              "Sync wait of a step that is not communication: DDP's finalize (reduced buckets "
                              "copied back) or the flat mode's flatten and copy-back.",
                              r, buckets=TIME_BUCKETS, registry=reg)
        self.wait = Histogram("ddp_fnn_peer_wait_duration_seconds",
                              "Waiting for peers: the latest rank's ready time minus this rank's, per step "
                              "(0 on the slowest rank).", r, buckets=TIME_BUCKETS, registry=reg)
        self.transfer = Histogram("ddp_fnn_transfer_duration_seconds",
                                  "Transfer: this rank's last all-reduce completion minus the latest rank's ready "
                                  "time, per step (what the network needed once every rank was there).",
                                  r, buckets=TIME_BUCKETS, registry=reg)
        self.last_ready_steps = Counter("ddp_fnn_last_ready_steps",
                                        "Steps in which this rank was the last one to hand its gradients over.",
                                        r, registry=reg)
        self.probe_wire = Counter("ddp_fnn_probe_wire_bytes",
                                  "Bytes this rank sent for the pre-training probe's all-reduces (ring formula), "
                                  "apart from the gradients' ddp_fnn_allreduce_wire_bytes_total.", r, registry=reg)
        self.probe_payload = Counter("ddp_fnn_probe_payload_bytes",
                                     "Bytes the pre-training probe handed to all-reduce.", r, registry=reg)
        self.setup_wire = Counter("ddp_fnn_setup_wire_bytes",
                                  "Bytes this rank sent to set the replicas up: DDP's broadcast of rank 0's "
                                  "parameters and buffers when it wraps the model (Gloo's binomial tree: "
                                  "ceil(log2 N) copies from rank 0, the copies a rank forwards elsewhere; "
                                  "2, 1, 0, 0 at 4 ranks).", r, registry=reg)
        self.control_wire = Counter("ddp_fnn_control_wire_bytes",
                                    "Bytes this rank sent in the job's own collectives beside the gradients and "
                                    "the probe (loss, NaN vote, ready times, clock ping-pongs, checks, gathers; "
                                    "observe/control.py), read every --log-every steps.", r, registry=reg)
        self.tcp_sent = Counter("ddp_fnn_tcp_sent_segments",
                                "TCP segments sent in this rank's network namespace since the run started "
                                "(/proc/net/snmp OutSegs; the whole namespace's TCP, read every --log-every steps).",
                                r, registry=reg)
        self.tcp_retrans = Counter("ddp_fnn_tcp_retransmitted_segments",
                                   "TCP segments retransmitted in this rank's network namespace since the run "
                                   "started (/proc/net/snmp RetransSegs; read every --log-every steps).",
                                   r, registry=reg)
        self.tcp_timeouts = Counter("ddp_fnn_tcp_timeouts",
                                    "TCP retransmission timeouts in this rank's network namespace since the run "
                                    "started (/proc/net/netstat TCPTimeouts): each stalls its flow for at least "
                                    "the minimum RTO, 200 ms on Linux; read every --log-every steps.",
                                    r, registry=reg)
        self.tcp_probes = Counter("ddp_fnn_tcp_loss_probes",
                                  "TCP tail-loss probes sent in this rank's network namespace since the run "
                                  "started (/proc/net/netstat TCPLossProbes; read every --log-every steps).",
                                  r, registry=reg)
        self.ar_calls = Counter("ddp_fnn_allreduce_calls", "Gradient all-reduce calls.", r, registry=reg)
        self.ar_payload = Counter("ddp_fnn_allreduce_payload_bytes",
                                  "Bytes of the tensors handed to all-reduce (after compression).", r, registry=reg)
        self.ar_wire = Counter("ddp_fnn_allreduce_wire_bytes",
                               "Bytes this rank sent for gradient all-reduce: ring formula 2(N-1)/N x payload "
                               "(--all-reduce hierarchical: its three phases' sum, docs/metrics.md).",
                               r, registry=reg)
        self.ar_duration = Histogram("ddp_fnn_allreduce_duration_seconds",
                                     "One gradient all-reduce (bucket), launch to completion.",
                                     r, buckets=TIME_BUCKETS, registry=reg)
        self.algbw = Gauge("ddp_fnn_allreduce_algbw_bytes_per_second",
                           "Last step's payload / comm time (nccl-tests algbw).", r, registry=reg)
        self.busbw = Gauge("ddp_fnn_allreduce_busbw_bytes_per_second",
                           "Last step's algbw x 2(N-1)/N (nccl-tests busbw).", r, registry=reg)
        self.grad_bytes = Gauge("ddp_fnn_gradient_bytes", "Uncompressed gradient bytes per step.", r, registry=reg)
        self.loss = Gauge("ddp_fnn_loss", "Global mean loss (split=train: last logged step; eval: held-out).",
                          r + ["split"], registry=reg)
        self.world = Gauge("ddp_fnn_world_size", "Workers in the job.", r, registry=reg)
        self.last_step = Gauge("ddp_fnn_last_step_timestamp_seconds", "Unix time the last step ended.",
                               r, registry=reg)
        self.mfu = None
        info = Info("ddp_fnn_run", "How this run is set up.", r, registry=reg)
        info.labels(rank=self.rank).info(run_info)
        if run_info.get("device", "").startswith("cuda"):
            self.mfu = Gauge("ddp_fnn_mfu_ratio", "Model FLOPs utilisation: achieved / device peak FLOP/s.",
                             r, registry=reg)
        # Children created up front: every counted or timed series exists from the first
        # scrape. Loss and MFU appear when first known: a placeholder 0 would be a lie.
        self._steps, self._samples = self.steps.labels(self.rank), self.samples.labels(self.rank)
        self._step_duration = self.step_duration.labels(self.rank)
        self._phase = {p: self.phase_duration.labels(self.rank, p) for p in PHASES}
        self._exposed = self.exposed.labels(self.rank)
        self._tail = self.tail.labels(self.rank)
        self._wait, self._transfer = self.wait.labels(self.rank), self.transfer.labels(self.rank)
        self._last_ready = self.last_ready_steps.labels(self.rank)
        self._probe_wire, self._probe_payload = self.probe_wire.labels(self.rank), self.probe_payload.labels(self.rank)
        self._setup_wire = self.setup_wire.labels(self.rank)
        self._control_wire, self._control_seen = self.control_wire.labels(self.rank), 0.0
        self._tcp = {"sent_segments": self.tcp_sent.labels(self.rank),
                     "retransmitted_segments": self.tcp_retrans.labels(self.rank),
                     "timeouts": self.tcp_timeouts.labels(self.rank),
                     "loss_probes": self.tcp_probes.labels(self.rank)}
        self._tcp_seen = dict.fromkeys(self._tcp, 0)
        self._calls, self._payload = self.ar_calls.labels(self.rank), self.ar_payload.labels(self.rank)
        self._wire, self._ar_duration = self.ar_wire.labels(self.rank), self.ar_duration.labels(self.rank)
        self._algbw, self._busbw = self.algbw.labels(self.rank), self.busbw.labels(self.rank)
        self._last_step = self.last_step.labels(self.rank)
        self.world.labels(self.rank).set(world_size)
        self._server = None

    def observe(self, rec: StepRecord) -> None:
        self._steps.inc()
        self._samples.inc(rec.samples)
        self._step_duration.observe(rec.step_s)
        for p in PHASES:
            self._phase[p].observe(rec.phases[p])
        self._exposed.observe(rec.exposed_s)
        if rec.detailed:
            self._tail.observe(rec.tail_s)
        if rec.wait_s is not None:
            self._wait.observe(rec.wait_s)
            self._transfer.observe(rec.transfer_s)
            if str(rec.last_ready_rank) == self.rank:
                self._last_ready.inc()
        payload = rec.payload_bytes
        if rec.collectives:
            self._calls.inc(rec.calls)
            self._payload.inc(payload)
            self._wire.inc(self._wire_bytes(payload) if self._wire_bytes is not None
                           else ring_wire_bytes(payload, self.world_size))
            if rec.detailed:                     # completions: --bucket-detail-every
                for c in rec.collectives:
                    self._ar_duration.observe(c.duration_s)
            comm = rec.comm_s
            if comm > 0 and rec.detailed:
                self._algbw.set(payload / comm)
                self._busbw.set(payload / comm * busbw_factor(self.world_size))
        self._last_step.set(rec.time_unix_s + rec.step_s)

    def set_gradient_bytes(self, nbytes: int) -> None:
        self.grad_bytes.labels(self.rank).set(nbytes)

    def set_wire_bytes(self, wire_bytes) -> None:
        """How many bytes a rank sends to all-reduce a payload (Synchroniser.wire_bytes)."""
        self._wire_bytes = wire_bytes

    def count_probe(self, traffic: dict | None) -> None:
        """The probe's bytes (predict.probe_traffic), once, before the first step."""
        if traffic:
            self._probe_wire.inc(traffic["wire_bytes"])
            self._probe_payload.inc(traffic["payload_bytes"])

    def count_setup(self, nbytes: int) -> None:
        """The replicas' set-up bytes (sync.module_state_broadcast_bytes), once."""
        self._setup_wire.inc(nbytes)

    def count_control(self, total_bytes: float) -> None:
        """The control collectives' bytes so far (control.TRAFFIC), at a log interval."""
        if total_bytes > self._control_seen:
            self._control_wire.inc(total_bytes - self._control_seen)
            self._control_seen = total_bytes

    def count_tcp(self, counts: dict[str, int] | None) -> None:
        """The namespace's TCP counters since the start (tcpstats.TcpCounters.read), at a
        log interval: each counter moves by what is new since the last call."""
        if counts:
            for name, child in self._tcp.items():
                new = counts[name] - self._tcp_seen[name]
                if new > 0:
                    child.inc(new)
                    self._tcp_seen[name] = counts[name]

    def set_loss(self, split: str, value: float) -> None:
        self.loss.labels(self.rank, split).set(value)

    def set_mfu(self, ratio: float) -> None:
        if self.mfu is not None:
            self.mfu.labels(self.rank).set(ratio)

    def serve(self, port: int, addr: str) -> None:
        """Serve /metrics on addr:port; a port in use is a ConfigError naming rank and port."""
        try:
            self._server = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"rank {self.rank}: --metrics-port: {addr}:{port} is already in use") from None
            raise ConfigError(f"rank {self.rank}: cannot serve metrics on {addr}:{port}: {e.strerror}") from None

    @property
    def bound_address(self) -> tuple[str, int] | None:
        return self._server[0].server_address[:2] if self._server else None

    def push(self, gateway: str, job: str = "ddp-fnn") -> None:
        push_to_gateway(gateway, job=job, registry=self.registry, grouping_key={"rank": self.rank})

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None


class NullMetrics:
    """Metrics off (--metrics-port 0): the loop calls the same methods, nothing happens."""

    registry = None
    bound_address = None

    def observe(self, rec: StepRecord) -> None: ...
    def set_gradient_bytes(self, nbytes: int) -> None: ...
    def set_wire_bytes(self, wire_bytes) -> None: ...
    def count_probe(self, traffic: dict | None) -> None: ...
    def count_setup(self, nbytes: int) -> None: ...
    def count_control(self, total_bytes: float) -> None: ...
    def count_tcp(self, counts: dict[str, int] | None) -> None: ...
    def set_loss(self, split: str, value: float) -> None: ...
    def set_mfu(self, ratio: float) -> None: ...
    def serve(self, port: int, addr: str) -> None: ...
    def push(self, gateway: str, job: str = "ddp-fnn") -> None: ...
    def close(self) -> None: ...
