"""Every step seen: a real 2-rank torchrun with several DDP buckets a step writes step
files, a timeline and its Prometheus counters (pushed to a real HTTP receiver at the
end); they agree with each other, and ddp-fnn's comm span and exposed time agree with
PyTorch DDP's own C++ logger (--ddp-logger), the independent witness."""

from __future__ import annotations

import http.server
import json
import statistics
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import torchrun
from ddp_fnn.perfmodel import probe as probemod
from ddp_fnn.observe import stepfile
from test_metrics import _Gateway
from test_observe import check_trace

pytestmark = pytest.mark.slow

STEPS = 40
WARMUP = 5          # DDP's first step (one bucket, then the rebuild) and the allocator's warm-up
# 2.4 M parameters; with a 1 MiB cap DDP makes 3 buckets (each 1024x1024 weight is one).
RUN = ("--layers", "256,1024,1024,1024,10", "--bucket-mb", "1", "--global-batch-size", "64",
       "--max-steps", str(STEPS), "--metrics-port", "0", "--progress", "none", "--no-probe",
       "--ddp-logger", "--timeline", "20:23", "--log-every", "7")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.received = []
    try:
        r = torchrun(2, "train", *RUN, "--output", str(out),
                     "--pushgateway", f"127.0.0.1:{server.server_address[1]}", timeout=600)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert r.returncode == 0, r.stderr[-3000:]
    pushed = {}
    for _method, path, body in _Gateway.received:
        rank = int(path.rsplit("/", 1)[1])
        pushed[rank] = {(s.name, s.labels.get("phase")): s.value
                        for f in text_string_to_metric_families(body) for s in f.samples}
    steps = {r: stepfile.read(out / f"steps-rank{r}.jsonl") for r in (0, 1)}
    witness = {r: {d["step"]: d for d in stepfile.read(out / f"ddp-logger-rank{r}.jsonl")} for r in (0, 1)}
    return out, steps, pushed, witness


def test_every_rank_writes_every_step_once(run):
    _, steps, _, _ = run
    for r in (0, 1):
        assert [d["step"] for d in steps[r]] == list(range(1, STEPS + 1))
        assert all(d["samples"] == 32 for d in steps[r])
        # DDP's first step is one bucket; then the rebuilt layout: at least 3 a step.
        assert all(len(d["collectives"]) >= 3 for d in steps[r][1:])


def test_prometheus_counters_equal_the_sums_over_the_step_file(run):
    _, steps, pushed, _ = run
    assert sorted(pushed) == [0, 1]
    for r in (0, 1):
        p, lines = pushed[r], steps[r]
        assert p[("ddp_fnn_steps_total", None)] == len(lines)
        assert p[("ddp_fnn_samples_total", None)] == sum(d["samples"] for d in lines)
        assert p[("ddp_fnn_allreduce_calls_total", None)] == sum(d["calls"] for d in lines)
        assert p[("ddp_fnn_allreduce_payload_bytes_total", None)] == sum(d["payload_bytes"] for d in lines)
        assert p[("ddp_fnn_allreduce_duration_seconds_count", None)] == sum(len(d["collectives"]) for d in lines)
        for metric, key in [("ddp_fnn_step_duration_seconds", "step_s"),
                            ("ddp_fnn_sync_exposed_duration_seconds", "exposed_s"),
                            ("ddp_fnn_sync_tail_duration_seconds", "tail_s")]:
            assert p[(metric + "_count", None)] == len(lines)
            assert p[(metric + "_sum", None)] == pytest.approx(sum(d[key] for d in lines), rel=1e-9)
        for phase in ("data", "forward", "backward", "optimizer"):
            assert p[("ddp_fnn_phase_duration_seconds_sum", phase)] == pytest.approx(
                sum(d[f"{phase}_s"] for d in lines), rel=1e-9)


def test_buckets_overlap_backward_so_exposed_is_less_than_comm(run):
    _, steps, _, _ = run
    for r in (0, 1):
        for d in steps[r]:
            assert 0 <= d["exposed_s"] <= d["comm_s"] + 1e-12, d
            assert d["comm_s"] <= d["comm_span_s"] + 1e-12
        later = steps[r][WARMUP:]
        # At least one bucket went on the wire while backward still computed the rest.
        assert statistics.fmean(d["exposed_s"] for d in later) < statistics.fmean(d["comm_s"] for d in later)
        assert any(c["start_s"] < d["ready_s"] for d in later for c in d["collectives"])


def test_summarys_bucket_schedule_is_the_step_files_hand_overs(run):
    """The schedule the prediction replays: each bucket's mean lead before the step's
    ready, over the steps after DDP's one-bucket first step, as the step file records them."""
    out, steps, _, _ = run
    summary = json.loads((out / "summary.json").read_text())
    later = steps[0][1:]
    schedule = summary["bucket_schedule"]
    assert len(schedule) == len(later[-1]["collectives"]) >= 3
    for k, b in enumerate(schedule):
        assert b["bucket"] == k and b["payload_bytes"] == later[-1]["collectives"][k]["payload_bytes"]
        assert b["lead_s"] == pytest.approx(
            statistics.fmean(d["ready_s"] - d["collectives"][k]["start_s"] for d in later), rel=1e-9, abs=1e-12)
        assert b["duration_s"] == pytest.approx(
            statistics.fmean(c["end_s"] - c["start_s"] for d in later for c in d["collectives"][k:k + 1]), rel=1e-9)
    # Handed over in order during backward: leads fall to 0 at the last bucket.
    leads = [b["lead_s"] for b in schedule]
    assert leads == sorted(leads, reverse=True) and leads[-1] == 0 and leads[0] > 0


def test_comm_span_and_exposed_agree_with_ddps_own_logger(run):
    """DDP's logger ends its comm interval at the end of finalize_backward, after the
    reduced buckets are copied back into .grad: inside ddp-fnn's sync tail, which runs
    from the last completion to backward() returning. So DDP's comm span and exposed
    time lie between ddp-fnn's and ddp-fnn's plus the tail. Means after warm-up, 10 %
    margin either side (the two clocks also read the start and ready a hook call apart)."""
    _, steps, _, witness = run
    for r in (0, 1):
        ours = {d["step"]: d for d in steps[r]}
        common = [s for s in witness[r] if s > WARMUP]
        assert len(common) >= STEPS - WARMUP - 2
        tail = statistics.fmean(ours[s]["tail_s"] for s in common)
        span = statistics.fmean(ours[s]["comm_span_s"] for s in common)
        ddp_span = statistics.fmean(witness[r][s]["backward_comm_span_s"] for s in common)
        exposed = statistics.fmean(ours[s]["exposed_s"] for s in common)
        ddp_exposed = statistics.fmean(witness[r][s]["exposed_s"] for s in common)
        print(f"rank {r}: comm span {span * 1e3:.3f} ms vs DDP {ddp_span * 1e3:.3f} ms; "
              f"exposed {exposed * 1e3:.3f} ms vs DDP {ddp_exposed * 1e3:.3f} ms; "
              f"tail {tail * 1e3:.3f} ms")
        assert 0.9 * span <= ddp_span <= 1.1 * (span + tail)
        assert 0.9 * exposed <= ddp_exposed <= 1.1 * (exposed + tail)


def test_timeline_is_trace_event_format_and_matches_the_step_files(run):
    out, steps, _, _ = run
    trace = json.loads((out / "timeline.json").read_text())
    complete = check_trace(trace)
    assert {e["pid"] for e in complete} == {0, 1}
    base = min(d["start_s"] for r in (0, 1) for d in steps[r] if d["step"] == 20)
    for r in (0, 1):
        expected = sorted((d["step"], c["bucket"], c["payload_bytes"], c["start_s"] + d["start_s"], c["end_s"]
                           + d["start_s"]) for d in steps[r] if 20 <= d["step"] <= 23 for c in d["collectives"])
        comm = [e for e in complete if e["pid"] == r and e["cat"] == "comm"]
        assert len(comm) == len(expected)
        got = sorted((e["args"]["step"], e["args"]["bucket"], e["args"]["payload_bytes"], e["ts"], e["ts"] + e["dur"])
                     for e in comm)
        shift = got[0][3] - (expected[0][3] - base) * 1e6      # the file's origin: the anchor barrier
        for g, x in zip(got, expected):
            assert g[:3] == x[:3]
            assert g[3] == pytest.approx((x[3] - base) * 1e6 + shift, abs=0.01)
            assert g[4] == pytest.approx((x[4] - base) * 1e6 + shift, abs=0.01)
        step_slices = sorted(e["args"]["step"] for e in complete if e["pid"] == r and e["cat"] == "step")
        assert step_slices == [20, 21, 22, 23]


def test_the_probe_fits_and_its_traffic_is_counted_in_summary_and_prometheus(tmp_path):
    """The demo's model (32,256,256,1: one 298 KB bucket) on 2 ranks: the probe reports a
    fit, and its bytes are in summary.json and in a Prometheus series of their own."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.received = []
    try:
        r = torchrun(2, "train", "--max-steps", "5", "--metrics-port", "0", "--progress", "none", "--probe",
                     "--output", str(tmp_path), "--pushgateway", f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "could not fit" not in r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    probe = summary["probe"]
    assert probe["method"] in ("least-squares", "two-point", "largest")
    assert summary["prediction"]["beta_bytes_per_second"] > 0
    assert summary["predicted_comm_time_per_step_s"] > 0
    # At N = 2 each rank sends the payload: every size of every attempt, all-reduced once
    # per warm-up and timed round.
    assert probe["calls_per_size"] == probemod.PROBE_WARMUP_ROUNDS + probemod.PROBE_ROUNDS
    assert probe["sizes"] == probe["attempt_sizes"][-1] and len(probe["attempt_sizes"]) in (1, 2)
    assert probe["wire_bytes"] == probe["payload_bytes"] == probe["calls_per_size"] * sum(
        sum(a) for a in probe["attempt_sizes"])
    assert probe["calls"] == probe["calls_per_size"] * sum(len(a) for a in probe["attempt_sizes"])
    assert max(probe["sizes"]) >= 1 << 20
    for _method, path, body in _Gateway.received:
        samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
        assert samples["ddp_fnn_probe_wire_bytes_total"] == probe["wire_bytes"], path
        assert samples["ddp_fnn_probe_payload_bytes_total"] == probe["payload_bytes"], path
    assert len(_Gateway.received) == 2


@pytest.mark.slow
def test_a_plain_run_starts_without_a_probe_and_says_why_nothing_is_predicted(tmp_path):
    """No --probe and no --bench-json: no probe before the first step, and the summary
    says why predicted_* are null."""
    r = torchrun(2, "train", "--max-steps", "3", "--metrics-port", "0", "--progress", "none",
                 "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["probe"] is None and summary["prediction"] is None
    assert summary["predicted_step_time_s"] is None
    assert "--probe" in summary["prediction_skipped"]
