"""ddp_fnn.observe.prometheus without processes: StepRecords in, Prometheus samples and summary
figures out. Every test uses its own CollectorRegistry and reads values back with
registry.get_sample_value(...); the HTTP tests use real sockets on loopback."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from ddp_fnn.config import ConfigError
from ddp_fnn.observe.prometheus import Metrics, NullMetrics, Summary
from ddp_fnn.core.intervals import union_length
from ddp_fnn.observe import PHASES, CollectiveRecord, StepRecord
from test_deploy import CONTRACT_SERIES

RANK, WORLD = 1, 4                      # 2(N-1)/N = 3/2 at N = 4: wire bytes differ from payload
RUN_INFO = {"backend": "gloo", "sync": "ddp", "compression": "none", "layers": "32,256,256,1", "device": "cpu"}


def make(registry: CollectorRegistry | None = None, run_info: dict | None = None) -> tuple[Metrics, CollectorRegistry]:
    reg = registry if registry is not None else CollectorRegistry()
    return Metrics(RANK, WORLD, run_info or RUN_INFO, registry=reg), reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, {"rank": str(RANK), **labels})


def record(step: int, collectives: list[tuple[int, int, float, float]], step_s: float = 0.5,
           exposed_s: float = 0.125, samples: int = 32, timestamp: float = 1_700_000_000.0,
           tail_s: float = 0.0) -> StepRecord:
    """A hand-made record: ``collectives`` as (payload, calls, start, end); ``timestamp``
    is when the step ended. (observe.make_record, tested in test_observe.py, makes the
    real ones from marks.)"""
    # Binary fractions throughout, so sums and ratios are exact in floating point.
    phases = {"data": 0.0625, "forward": 0.125, "backward": 0.25, "optimizer": 0.03125}
    colls = [CollectiveRecord(i, p, c, a, b) for i, (p, c, a, b) in enumerate(collectives)]
    spans = [(c.start_s, c.end_s) for c in colls]
    return StepRecord(step=step, samples=samples, time_unix_s=timestamp - step_s, start_s=100.0, step_s=step_s,
                      phases=phases, intervals=[], collectives=colls,
                      ready_s=max((a for a, _ in spans), default=None), sync_start_s=0.0, sync_end_s=0.0,
                      comm_s=union_length(spans),
                      comm_span_s=(max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0,
                      exposed_s=exposed_s, tail_s=tail_s)


# Three buckets: the second overlaps the first, the third stands alone; the middle one
# stands for PowerSGD's three all-reduces in one record. Busy union: [0.125, 0.5] and
# [0.625, 0.75] -> 0.375 + 0.125 = 0.5 s.
COLLECTIVES = [(1024, 1, 0.125, 0.375), (2048, 3, 0.25, 0.5), (4096, 1, 0.625, 0.75)]
PAYLOAD = 1024 + 2048 + 4096


# ---------------------------------------------------------------------------------------
# StepRecord: comm time is the union of the collectives' intervals
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("collectives,union", [
    ([], 0.0),
    ([(8, 1, 0.25, 0.5)], 0.25),
    (COLLECTIVES, 0.5),
    (list(reversed(COLLECTIVES)), 0.5),                              # launch order does not matter
    ([(8, 1, 0.0, 1.0), (8, 1, 0.25, 0.5)], 1.0),                    # nested: counted once
    ([(8, 1, 0.0, 0.25), (8, 1, 0.25, 0.5)], 0.5),                   # touching
    ([(8, 1, 0.0, 0.25), (8, 1, 0.5, 0.75), (8, 1, 0.125, 0.625)], 0.75),  # a bridge joins two
])
def test_comm_time_is_the_length_of_the_union_of_busy_intervals(collectives, union):
    rec = record(1, collectives)
    assert rec.comm_s == union
    assert rec.payload_bytes == sum(c[0] for c in collectives)
    assert rec.calls == sum(c[1] for c in collectives)


# ---------------------------------------------------------------------------------------
# Metrics: what one rank exposes
# ---------------------------------------------------------------------------------------

def test_every_series_exists_before_the_first_step():
    _, reg = make()
    assert value(reg, "ddp_fnn_steps_total") == 0
    assert value(reg, "ddp_fnn_samples_total") == 0
    assert value(reg, "ddp_fnn_allreduce_calls_total") == 0
    assert value(reg, "ddp_fnn_allreduce_payload_bytes_total") == 0
    assert value(reg, "ddp_fnn_allreduce_wire_bytes_total") == 0
    assert value(reg, "ddp_fnn_step_duration_seconds_count") == 0
    assert value(reg, "ddp_fnn_sync_exposed_duration_seconds_count") == 0
    for p in PHASES:
        assert value(reg, "ddp_fnn_phase_duration_seconds_count", phase=p) == 0
    for split in ("train", "eval"):
        assert value(reg, "ddp_fnn_loss", split=split) is None      # appears once a loss is known
    assert value(reg, "ddp_fnn_world_size") == WORLD
    assert value(reg, "ddp_fnn_run_info", **RUN_INFO) == 1


def test_steps_feed_counters_histograms_and_bandwidth_gauges():
    m, reg = make()
    m.observe(record(1, COLLECTIVES, timestamp=1_700_000_000.0))
    m.observe(record(2, [(PAYLOAD, 1, 0.0, 0.25)], step_s=0.25, exposed_s=0.25, timestamp=1_700_000_001.5))

    assert value(reg, "ddp_fnn_steps_total") == 2
    assert value(reg, "ddp_fnn_samples_total") == 64
    assert value(reg, "ddp_fnn_allreduce_calls_total") == 5 + 1       # calls, not records
    assert value(reg, "ddp_fnn_allreduce_payload_bytes_total") == 2 * PAYLOAD
    # Ring all-reduce at N = 4: each rank sends 2(N-1)/N = 3/2 of the payload.
    assert value(reg, "ddp_fnn_allreduce_wire_bytes_total") == 2 * PAYLOAD * 3 / 2

    # One duration observation per record (bucket), launch to completion.
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_count") == 4
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_sum") == 0.25 + 0.25 + 0.125 + 0.25
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_bucket", le="0.1") == 0
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_bucket", le="0.25") == 4       # le is inclusive
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_bucket", le="+Inf") == 4

    assert value(reg, "ddp_fnn_step_duration_seconds_count") == 2
    assert value(reg, "ddp_fnn_step_duration_seconds_sum") == 0.75
    assert value(reg, "ddp_fnn_step_duration_seconds_bucket", le="0.25") == 1
    assert value(reg, "ddp_fnn_step_duration_seconds_bucket", le="0.5") == 2
    assert value(reg, "ddp_fnn_sync_exposed_duration_seconds_count") == 2
    assert value(reg, "ddp_fnn_sync_exposed_duration_seconds_sum") == 0.375
    assert value(reg, "ddp_fnn_phase_duration_seconds_sum", phase="backward") == 0.5
    assert value(reg, "ddp_fnn_phase_duration_seconds_sum", phase="optimizer") == 0.0625
    for p in PHASES:
        assert value(reg, "ddp_fnn_phase_duration_seconds_count", phase=p) == 2

    # The gauges hold the last step's: payload / comm-time union, busbw = algbw x 2(N-1)/N.
    assert value(reg, "ddp_fnn_allreduce_algbw_bytes_per_second") == PAYLOAD / 0.25
    assert value(reg, "ddp_fnn_allreduce_busbw_bytes_per_second") == PAYLOAD / 0.25 * 3 / 2
    assert value(reg, "ddp_fnn_last_step_timestamp_seconds") == 1_700_000_001.5


def test_algbw_uses_the_union_not_the_sum_of_bucket_times():
    m, reg = make()
    m.observe(record(1, COLLECTIVES))
    # Bucket times add up to 0.25 + 0.25 + 0.125 = 0.625 s; the network was busy 0.5 s.
    assert value(reg, "ddp_fnn_allreduce_algbw_bytes_per_second") == PAYLOAD / 0.5
    assert value(reg, "ddp_fnn_allreduce_busbw_bytes_per_second") == PAYLOAD / 0.5 * 3 / 2


def test_a_step_without_collectives_moves_no_sync_series():
    m, reg = make()
    m.observe(record(1, COLLECTIVES))
    m.observe(record(2, [], exposed_s=0.0))
    assert value(reg, "ddp_fnn_steps_total") == 2
    assert value(reg, "ddp_fnn_allreduce_calls_total") == 5
    assert value(reg, "ddp_fnn_allreduce_payload_bytes_total") == PAYLOAD
    assert value(reg, "ddp_fnn_allreduce_duration_seconds_count") == 3
    assert value(reg, "ddp_fnn_allreduce_algbw_bytes_per_second") == PAYLOAD / 0.5   # the last measured


def test_zero_comm_time_leaves_bandwidth_gauges_alone():
    m, reg = make()
    m.observe(record(1, [(4096, 1, 0.5, 0.5)]))         # a clock too coarse to see the transfer
    assert value(reg, "ddp_fnn_allreduce_payload_bytes_total") == 4096
    assert value(reg, "ddp_fnn_allreduce_algbw_bytes_per_second") == 0
    assert value(reg, "ddp_fnn_allreduce_busbw_bytes_per_second") == 0


def test_setters_gradient_bytes_loss_and_mfu_only_on_cuda():
    m, reg = make()
    m.set_gradient_bytes(4 * 75_265)
    m.set_loss("train", 0.5)
    m.set_loss("eval", 0.75)
    m.set_mfu(0.25)
    assert value(reg, "ddp_fnn_gradient_bytes") == 4 * 75_265
    assert value(reg, "ddp_fnn_loss", split="train") == 0.5
    assert value(reg, "ddp_fnn_loss", split="eval") == 0.75
    assert value(reg, "ddp_fnn_mfu_ratio") is None                    # no peak FLOP/s on a CPU

    cuda, creg = make(run_info={**RUN_INFO, "backend": "nccl", "device": "cuda:1"})
    assert any(f.name == "ddp_fnn_mfu_ratio" for f in creg.collect())   # the gauge is registered ...
    assert value(creg, "ddp_fnn_mfu_ratio") is None                     # ... its series appears when first set
    cuda.set_mfu(0.375)
    assert value(creg, "ddp_fnn_mfu_ratio") == 0.375


def test_every_sample_carries_this_rank_and_a_contract_name():
    m, reg = make(run_info={**RUN_INFO, "device": "cuda:0"})
    m.observe(record(1, COLLECTIVES))
    m.set_gradient_bytes(8)
    m.set_loss("train", 1.0)
    m.set_mfu(0.5)
    names = set()
    for family in reg.collect():
        for s in family.samples:
            assert s.labels.get("rank") == str(RANK), s
            if not s.name.endswith("_created"):
                names.add(s.name)
    assert names == CONTRACT_SERIES                   # tests/test_deploy.py's list: all of it, nothing else


def test_registries_are_independent():
    a, ra = make()
    _, rb = make()
    a.observe(record(1, COLLECTIVES))
    assert value(ra, "ddp_fnn_steps_total") == 1
    assert value(rb, "ddp_fnn_steps_total") == 0


# ---------------------------------------------------------------------------------------
# Summary: the figures of summary.json
# ---------------------------------------------------------------------------------------

FIGURE_KEYS = {
    "step_time_p50_s", "step_time_p95_s", "step_time_mean_s", "allreduce_calls_per_step",
    "allreduce_payload_bytes_per_step", "allreduce_wire_bytes_per_step", "allreduce_payload_bytes_total",
    "allreduce_wire_bytes_total", "comm_time_per_step_s", "comm_span_per_step_s", "exposed_comm_time_per_step_s",
    "sync_tail_per_step_s", "algbw_bytes_per_second", "busbw_bytes_per_second",
    "wait_for_peers_per_step_s", "transfer_per_step_s", "last_ready_steps", "last_ready_share",
    "bucket_schedule", "detailed_steps",
}


def test_summary_of_no_steps_is_empty():
    assert Summary(world_size=WORLD).figures() == {}


def test_summary_leaves_the_first_step_out_of_timings_but_not_out_of_bytes():
    s = Summary(world_size=WORLD)
    # Step 1: one big bucket and a slow step (DDP's bucket rebuild, warm-up).
    s.add(record(1, [(PAYLOAD, 1, 0.0, 4.0)], step_s=8.0, exposed_s=4.0))
    for i, step_s in enumerate((0.25, 0.5, 0.75, 1.0, 1.25), start=2):
        s.add(record(i, COLLECTIVES, step_s=step_s, exposed_s=0.125))
    f = s.figures()
    assert set(f) == FIGURE_KEYS
    assert f["step_time_p50_s"] == 0.75
    assert f["step_time_mean_s"] == 0.75
    assert f["step_time_p95_s"] == pytest.approx(1.2)           # inclusive method: 1 + 0.8 x 0.25
    assert f["comm_time_per_step_s"] == 0.5
    assert f["exposed_comm_time_per_step_s"] == 0.125
    assert f["comm_span_per_step_s"] == 0.625                  # 0.125 .. 0.75, the gap included
    assert f["algbw_bytes_per_second"] == 5 * PAYLOAD / (5 * 0.5)
    assert f["busbw_bytes_per_second"] == f["algbw_bytes_per_second"] * 3 / 2
    # Bytes and calls: every step, the first included.
    assert f["allreduce_payload_bytes_total"] == 6 * PAYLOAD
    assert f["allreduce_payload_bytes_per_step"] == PAYLOAD
    assert f["allreduce_wire_bytes_total"] == 6 * PAYLOAD * 3 / 2
    assert f["allreduce_wire_bytes_per_step"] == PAYLOAD * 3 / 2
    assert f["allreduce_calls_per_step"] == (1 + 5 * 5) / 6
    assert s.samples == 6 * 32


def test_bucket_schedule_is_each_buckets_mean_lead_before_ready_after_the_rebuild():
    s = Summary(world_size=WORLD)
    s.add(record(1, [(PAYLOAD, 1, 0.0, 4.0)]))                     # DDP's first step: one bucket of all
    s.add(record(2, COLLECTIVES))                                   # ready = the last hand-over, 0.625
    s.add(record(3, [(1024, 1, 0.375, 0.5), (2048, 3, 0.5, 0.75), (4096, 1, 0.625, 0.875)]))
    assert s.figures()["bucket_schedule"] == [
        {"bucket": 0, "payload_bytes": 1024, "lead_s": (0.5 + 0.25) / 2, "duration_s": (0.25 + 0.125) / 2},
        {"bucket": 1, "payload_bytes": 2048, "lead_s": (0.375 + 0.125) / 2, "duration_s": 0.25},
        {"bucket": 2, "payload_bytes": 4096, "lead_s": 0.0, "duration_s": (0.125 + 0.25) / 2},
    ]


def test_peer_figures_feed_histograms_the_last_ready_counter_and_the_summary():
    m, reg = make()
    s = Summary(world_size=WORLD, rank=RANK)
    for step, (wait, transfer, last) in enumerate([(0.0, 0.25, RANK), (0.125, 0.25, 0), (0.0, 0.5, RANK)], 1):
        rec = record(step, COLLECTIVES)
        rec.wait_s, rec.transfer_s, rec.last_ready_rank = wait, transfer, last
        m.observe(rec)
        s.add(rec)
    m.observe(record(4, COLLECTIVES))                 # not exchanged yet: no peer figures
    assert value(reg, "ddp_fnn_peer_wait_duration_seconds_count") == 3
    assert value(reg, "ddp_fnn_peer_wait_duration_seconds_sum") == 0.125
    assert value(reg, "ddp_fnn_transfer_duration_seconds_sum") == 1.0
    assert value(reg, "ddp_fnn_last_ready_steps_total") == 2
    f = s.figures()                                   # steps 2 and 3 (the first is left out)
    assert f["wait_for_peers_per_step_s"] == 0.0625 and f["transfer_per_step_s"] == 0.375
    assert f["last_ready_steps"] == 2 and f["last_ready_share"] == 2 / 3


def test_summary_of_one_step_uses_it():
    s = Summary(world_size=2)
    s.add(record(1, COLLECTIVES, step_s=0.5, exposed_s=0.25))
    f = s.figures()
    assert f["step_time_p50_s"] == f["step_time_p95_s"] == f["step_time_mean_s"] == 0.5
    assert f["exposed_comm_time_per_step_s"] == 0.25
    assert f["allreduce_wire_bytes_per_step"] == PAYLOAD                 # 2(N-1)/N = 1 at N = 2


def test_summary_without_collectives_reports_zero_bandwidth():
    s = Summary(world_size=1)
    s.add(record(1, [], exposed_s=0.0))
    s.add(record(2, [], exposed_s=0.0))
    f = s.figures()
    assert f["algbw_bytes_per_second"] == f["busbw_bytes_per_second"] == 0.0
    assert f["allreduce_payload_bytes_total"] == f["allreduce_wire_bytes_total"] == 0


# ---------------------------------------------------------------------------------------
# Serving and pushing
# ---------------------------------------------------------------------------------------

def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}


def test_serve_answers_on_loopback_and_close_stops_it():
    m, _ = make()
    port = free_port()
    m.serve(port, "127.0.0.1")
    try:
        assert m.bound_address == ("127.0.0.1", port)
        m.observe(record(1, COLLECTIVES))
        samples = scrape(port)
        assert samples["ddp_fnn_steps_total"].value == 1
        assert samples["ddp_fnn_steps_total"].labels == {"rank": str(RANK)}
        assert samples["ddp_fnn_allreduce_wire_bytes_total"].value == PAYLOAD * 3 / 2
    finally:
        m.close()
    assert m.bound_address is None
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_port_in_use_is_a_config_error_naming_rank_and_port():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        m, _ = make()
        with pytest.raises(ConfigError, match=rf"^rank {RANK}: --metrics-port: 127\.0\.0\.1:{port} is already in use$"):
            m.serve(port, "127.0.0.1")
        assert m.bound_address is None
        m.close()                                     # nothing to close: no error


class _Gateway(http.server.BaseHTTPRequestHandler):
    """Records what a Pushgateway would receive."""
    received: list[tuple[str, str, str]] = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.received.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_push_puts_the_registry_under_job_and_rank():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.received = []
    try:
        m, _ = make()
        m.observe(record(1, COLLECTIVES))
        m.push(f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    (method, path, body), = _Gateway.received
    assert (method, path) == ("PUT", f"/metrics/job/ddp-fnn/rank/{RANK}")
    samples = {s.name: s for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples["ddp_fnn_steps_total"].value == 1
    assert samples["ddp_fnn_allreduce_payload_bytes_total"].value == PAYLOAD


def test_null_metrics_is_inert():
    null = NullMetrics()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    null.serve(port, "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))                    # serve() opened nothing: the port is still free
    null.observe(record(1, COLLECTIVES))
    null.set_gradient_bytes(8)
    null.set_loss("train", 1.0)
    null.set_mfu(0.5)
    null.push("127.0.0.1:1")                           # nothing listens there; nothing is sent
    null.close()
    assert null.registry is None and null.bound_address is None
