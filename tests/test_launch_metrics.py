"""What a real 2-worker torchrun job serves on /metrics, and what a real Prometheus makes
of it with deploy/prometheus's rules and the Grafana dashboard's queries.

Each launch is a real `torchrun --standalone --nproc-per-node 2 -m ddp_fnn train` with
--metrics-linger, so /metrics stays up after the last step; the test polls both ranks'
endpoints (BASE + LOCAL_RANK) until ddp_fnn_steps_total reaches --max-steps, reads
what it needs, and stops torchrun and its workers. A launch costs 10-20 s of two shared
CPUs, so each one carries several checks.

Exact byte counts come from the model's shape (ddp_fnn.perfmodel.netmodel): P parameters are
4P bytes of fp32 gradient per step, 2P with the fp16/bf16 compress hooks, whatever the
bucketing; the ring's wire bytes are 2(N-1)/N of that.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, free_port
from ddp_fnn.core.wire import ring_wire_bytes
from ddp_fnn.perfmodel.netmodel import bucket_layout, parameter_count
from test_deploy import PROM_DIR, dashboard_queries, rules

PROMETHEUS = Path("/usr/bin/prometheus")
NPROC = 2
# Several DDP buckets: each 512x512 weight (1 MiB) overflows a 0.25 MiB cap on its own.
# 542,721 parameters, buckets (as DDP all-reduces them) of 1,052,676 + 1,050,624 + 67,584 bytes.
LAYERS = (32, 512, 512, 512, 1)
BUCKET_MB = 0.25
BATCH = 64
COMMON = ("--layers", ",".join(map(str, LAYERS)), "--bucket-mb", str(BUCKET_MB), "--global-batch-size", str(BATCH),
          "--samples", "2048", "--lr", "1e-4", "--progress", "none", "--metrics-linger", "60")
SCRAPE_DEADLINE_S = 120


# ---------------------------------------------------------------------------------------
# Launching and stopping a job
# ---------------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(nproc: int = NPROC, avoid: tuple[int, ...] = ()) -> int:
    """A base port B with B .. B+nproc-1 all free on loopback right now."""
    for _ in range(100):
        base = free_port()
        ports = range(base, base + nproc)
        if base + nproc <= 65536 and not set(ports) & set(avoid) and all(_port_free(p) for p in ports[1:]):
            return base
    raise RuntimeError(f"no {nproc} consecutive free ports found")


@dataclass
class Job:
    proc: subprocess.Popen
    base: int
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def launch(tmp_path: Path, base: int, *args: str, name: str = "job") -> Job:
    """torchrun in its own session (a Ctrl-C at the terminal is not also its), output to
    a file (a pipe nobody reads could fill and block the workers)."""
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
           "-m", "ddp_fnn", "train", "--metrics-port", str(base), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    return Job(proc, base, log)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()            # state ppid pgrp ... starttime (22nd)
    return fields[0], int(fields[1]), int(fields[19])


def process_tree(root: int) -> dict[int, int]:
    """pid -> start time of `root` and its live descendants. torchrun starts each worker in
    a session of its own, so the agent's process group does not hold them: follow parents."""
    stats = {int(e.name): _stat(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        if st is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if stats.get(pid) is not None and stats[pid][0] != "Z":
            tree[pid] = stats[pid][2]
            todo += children.get(pid, [])
    return tree


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and st[2] == started   # same start time: not a reused pid


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process and everything it started (torchrun forwards it to its workers
    too), wait; SIGKILL whatever is left. Leaves nothing running."""
    tree = process_tree(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, started in tree.items():
            if _alive(pid, started):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + timeout
        while any(_alive(p, s) for p, s in tree.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(_alive(p, s) for p, s in tree.items()):
            return
    left = [p for p, s in tree.items() if _alive(p, s)]
    raise RuntimeError(f"processes {left} survived SIGKILL")


@pytest.fixture
def jobs():
    """Start jobs with jobs(tmp_path, base, *args); every one is stopped at the end."""
    started: list[Job] = []

    def start(*a, **kw) -> Job:
        job = launch(*a, **kw)
        started.append(job)
        return job

    yield start
    for job in started:
        stop(job.proc)


# ---------------------------------------------------------------------------------------
# Scraping
# ---------------------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    hits = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0]


def scrape_finished(job: Job, steps: int) -> dict[int, Samples]:
    """Poll every rank's /metrics until its ddp_fnn_steps_total == steps and two scrapes
    in a row agree; rank -> samples. (A scrape is not atomic with the worker's updates:
    one can land after the last step's steps_total += 1 and before its other counters
    move. Two equal scrapes at the final step count mean the worker is lingering.)"""
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    done: dict[int, Samples] = {}
    last: dict[int, Samples] = {}
    while len(done) < NPROC:
        assert time.monotonic() < deadline, f"ranks {sorted(done)} of {NPROC} finished in time:\n{job.tail()}"
        assert job.proc.poll() is None, f"torchrun exited ({job.proc.returncode}) before lingering:\n{job.tail()}"
        for local_rank in range(NPROC):
            if local_rank in done:
                continue
            try:
                samples = scrape(job.base + local_rank)
            except (urllib.error.URLError, ConnectionError, OSError):
                continue                                   # not serving yet
            if get(samples, "ddp_fnn_steps_total") == steps and samples == last.get(local_rank):
                done[local_rank] = samples
            last[local_rank] = samples
        time.sleep(0.2)
    return done


# ---------------------------------------------------------------------------------------
# Listening sockets, from /proc
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.command}[{self.pid}] {host}:{self.port}"


def _proc_address(hex_addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6}'s ADDR:PORT: the address in 32-bit host-order (little-endian) words."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    return ipaddress.ip_address(raw), int(port, 16)


def listening_sockets(root: int) -> list[Listener]:
    """Every TCP socket in LISTEN state (st 0A) held by `root` or a process it started."""
    found = []
    for pid in process_tree(root):
        try:
            inodes = set()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
            command = Path(f"/proc/{pid}/comm").read_text().strip()
            tables = [Path(f"/proc/{pid}/net/{t}").read_text().splitlines()[1:] for t in ("tcp", "tcp6")]
        except OSError:
            continue                                        # exited meanwhile
        for line in (line for table in tables for line in table):
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:
                found.append(Listener(pid, command, *_proc_address(local)))
    return found


def test_proc_address_decodes_ipv4_and_ipv6():
    assert _proc_address("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert _proc_address("00000000:24D8") == (ipaddress.ip_address("0.0.0.0"), 9432)
    assert _proc_address("00000000000000000000000001000000:0050") == (ipaddress.ip_address("::1"), 80)
    assert _proc_address("0000000000000000FFFF00000100007F:0050") == (ipaddress.ip_address("::ffff:127.0.0.1"), 80)


def metrics_listeners(job: Job) -> dict[int, Listener]:
    """local rank -> the socket serving its /metrics; each held by a worker, not the agent."""
    listeners = listening_sockets(job.proc.pid)
    by_port = {}
    for r in range(NPROC):
        on_port = [ls for ls in listeners if ls.port == job.base + r]
        assert len(on_port) == 1, f"port {job.base + r}: {[str(x) for x in on_port]} of {[str(x) for x in listeners]}"
        assert on_port[0].pid != job.proc.pid, f"the torchrun agent, not a worker, holds {on_port[0]}"
        by_port[r] = on_port[0]
    return by_port


def worker_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def describe_listeners(job: Job, record_property) -> str:
    """Every listening socket of the job, with the store's address as the workers see it:
    reported (record_property and stdout), not asserted -- torchrun's TCPStore binds what
    torch makes it bind; see docs/metrics.md."""
    listeners = listening_sockets(job.proc.pid)
    metrics_ports = {job.base + r for r in range(NPROC)}
    workers = sorted({ls.pid for ls in listeners if ls.port in metrics_ports})
    env = worker_env(workers[0]) if workers else {}
    lines = [f"{'metrics' if ls.port in metrics_ports else 'agent' if ls.pid == job.proc.pid else 'worker'}: {ls}"
             for ls in sorted(listeners, key=lambda x: (x.pid, x.port))]
    lines.append(f"workers' MASTER_ADDR:MASTER_PORT = {env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}")
    text = "\n".join(lines)
    record_property("listening_sockets", text)
    print(text)
    return text


# ---------------------------------------------------------------------------------------
# What every run must show
# ---------------------------------------------------------------------------------------

P = parameter_count(LAYERS)
BUCKETS = len(bucket_layout(LAYERS, BUCKET_MB))


def ddp_calls(steps: int) -> int:
    """DDP's all-reduce calls over `steps` optimizer steps. Step 1 runs on DDP's initial
    bucket assignment, which with find_unused_parameters=False is one bucket holding every
    gradient (1 call); the Reducer then rebuilds its buckets in the order the gradients
    became ready, and every later step makes len(bucket_layout(...)) calls. The runs below
    use different step counts, so together they pin down both numbers: 1 + (S-1) x b
    for two values of S has one solution."""
    return 1 + (steps - 1) * BUCKETS


def check_common(ranks: dict[int, Samples], *, steps: int, payload_per_step: int, calls: int,
                 sync: str, compression: str) -> None:
    assert sorted(ranks) == list(range(NPROC))
    for local_rank, s in ranks.items():
        rank = str(local_rank)                             # one node: global rank = local rank
        # Every sample names its rank, and only this rank.
        ranks_seen = {dict(ls).get("rank") for _, ls in s}
        assert ranks_seen == {rank}, f"rank {rank}'s endpoint has samples with rank labels {ranks_seen}"

        assert get(s, "ddp_fnn_steps_total") == steps
        # Each rank takes B/N rows per optimizer step (in --grad-accum micro-batches).
        assert get(s, "ddp_fnn_samples_total") == steps * BATCH // NPROC
        assert get(s, "ddp_fnn_allreduce_payload_bytes_total") == steps * payload_per_step
        assert get(s, "ddp_fnn_allreduce_calls_total") == calls
        assert get(s, "ddp_fnn_allreduce_duration_seconds_count") == calls
        assert get(s, "ddp_fnn_allreduce_wire_bytes_total") == ring_wire_bytes(steps * payload_per_step, NPROC)
        assert get(s, "ddp_fnn_allreduce_wire_bytes_total") == steps * payload_per_step * 2 * (NPROC - 1) / NPROC
        assert get(s, "ddp_fnn_gradient_bytes") == 4 * P
        assert get(s, "ddp_fnn_world_size") == NPROC
        assert get(s, "ddp_fnn_run_info", rank=rank, backend="gloo", sync=sync, compression=compression,
                   layers=",".join(map(str, LAYERS)), device="cpu") == 1
        # One observation per optimizer step, not per micro-step.
        assert get(s, "ddp_fnn_step_duration_seconds_count") == steps
        assert get(s, "ddp_fnn_sync_exposed_duration_seconds_count") == steps
        phases = {dict(ls)["phase"] for n, ls in s if n == "ddp_fnn_phase_duration_seconds_count"}
        assert phases == {"data", "forward", "backward", "optimizer"}
        for p in phases:
            assert get(s, "ddp_fnn_phase_duration_seconds_count", phase=p) == steps
        assert get(s, "ddp_fnn_step_duration_seconds_sum") > 0
        assert get(s, "ddp_fnn_allreduce_algbw_bytes_per_second") > 0
        assert get(s, "ddp_fnn_allreduce_busbw_bytes_per_second") == pytest.approx(
            get(s, "ddp_fnn_allreduce_algbw_bytes_per_second") * 2 * (NPROC - 1) / NPROC)
        assert math.isfinite(get(s, "ddp_fnn_loss", split="train"))
        assert math.isfinite(get(s, "ddp_fnn_loss", split="eval"))
        assert get(s, "ddp_fnn_last_step_timestamp_seconds") > time.time() - 600
    # Both ranks report the same global losses (all-reduced), not each its own shard's.
    for split in ("train", "eval"):
        assert get(ranks[0], "ddp_fnn_loss", split=split) == get(ranks[1], "ddp_fnn_loss", split=split)


# ---------------------------------------------------------------------------------------
# The launches
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_fp32_several_buckets_and_loopback_only(tmp_path, jobs, record_property):
    """fp32, no compression: 4P bytes a step in 1 + (S-1) x b calls; /metrics on 127.0.0.1."""
    steps = 6
    job = jobs(tmp_path, free_base(), *COMMON, "--sync", "ddp", "--max-steps", str(steps))
    ranks = scrape_finished(job, steps)
    check_common(ranks, steps=steps, payload_per_step=4 * P, calls=ddp_calls(steps), sync="ddp", compression="none")
    # Nobody asked for another address: the metrics endpoints bind loopback only.
    for r, ls in metrics_listeners(job).items():
        assert ls.address == ipaddress.ip_address("127.0.0.1"), f"rank {r}: {ls}"
    describe_listeners(job, record_property)


@pytest.mark.slow
def test_ddp_fp16_with_grad_accum_syncs_once_per_optimizer_step(tmp_path, jobs):
    """fp16 hook: 2P bytes a step. --grad-accum 2: the first micro-step runs under no_sync,
    so payload and calls are per optimizer step, as without accumulation."""
    steps = 5
    job = jobs(tmp_path, free_base(), *COMMON, "--sync", "ddp", "--compression", "fp16", "--grad-accum", "2",
               "--max-steps", str(steps))
    ranks = scrape_finished(job, steps)
    check_common(ranks, steps=steps, payload_per_step=2 * P, calls=ddp_calls(steps), sync="ddp",
                 compression="fp16")


@pytest.mark.slow
def test_ddp_bf16_and_metrics_on_all_interfaces_when_asked(tmp_path, jobs):
    """bf16 hook: 2P bytes a step. --metrics-addr 0.0.0.0 (what containers pass) binds it."""
    steps = 4
    job = jobs(tmp_path, free_base(), *COMMON, "--sync", "ddp", "--compression", "bf16", "--max-steps", str(steps),
               "--metrics-addr", "0.0.0.0")
    ranks = scrape_finished(job, steps)
    check_common(ranks, steps=steps, payload_per_step=2 * P, calls=ddp_calls(steps), sync="ddp", compression="bf16")
    for r, ls in metrics_listeners(job).items():
        assert ls.address == ipaddress.ip_address("0.0.0.0"), f"rank {r}: {ls}"


@pytest.mark.slow
def test_flat_allreduce_one_call_of_every_gradient_per_step(tmp_path, jobs):
    """--sync allreduce: one flat fp32 all-reduce of all 4P bytes after backward, every step
    (step 1 included); all of it is exposed, so exposed time >= the all-reduce time."""
    steps = 4
    job = jobs(tmp_path, free_base(), *COMMON, "--sync", "allreduce", "--max-steps", str(steps))
    ranks = scrape_finished(job, steps)
    check_common(ranks, steps=steps, payload_per_step=4 * P, calls=steps, sync="allreduce", compression="none")
    for s in ranks.values():
        assert get(s, "ddp_fnn_sync_exposed_duration_seconds_sum") >= get(s, "ddp_fnn_allreduce_duration_seconds_sum")


# ---------------------------------------------------------------------------------------
# A real Prometheus: every dashboard query and rule returns data
# ---------------------------------------------------------------------------------------

COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def with_bool(expr: str) -> str:
    """The expression with every comparison made a `bool` comparison: 0/1 for every series
    both sides have, instead of only the series that pass. An alert's expression returns
    nothing while it is not firing; this form returns data exactly when its operands do.
    Comparisons inside label matchers and strings are left alone."""
    out, i, depth, quote = [], 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in COMPARISONS if expr.startswith(o, i)), None)
            if op and not expr.startswith("=~", i) and not expr.startswith("!~", i):
                rest = expr[i + len(op):]
                out.append(op if rest.lstrip().startswith("bool") else op + " bool")
                i += len(op)
                continue
        out.append(c)
        i += 1
    return "".join(out)


def test_with_bool_turns_filters_into_bool_comparisons():
    assert with_bool("a > 0.5") == "a > bool 0.5"
    assert with_bool("(time() - x > 60)\n  and on (job) (up == 1)") == "(time() - x > bool 60)\n  and on (job) (up == bool 1)"
    assert with_bool("a > on (job) group_left () (1.25 * b)") == "a > bool on (job) group_left () (1.25 * b)"
    assert with_bool('x{a!="1",b=~"2"} >= bool 3') == 'x{a!="1",b=~"2"} >= bool 3'
    assert with_bool('x{a="<"} <= y') == 'x{a="<"} <= bool y'


def prometheus_config(base: int) -> dict:
    """deploy/prometheus/prometheus.yml with its rule files at absolute paths and its
    targets replaced by this job's two ranks; scraped and evaluated every second."""
    with open(PROM_DIR / "prometheus.yml") as f:
        cfg = yaml.safe_load(f)
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((PROM_DIR / pattern).resolve()) for pattern in cfg["rule_files"]]
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{base + r}" for r in range(NPROC)]}]
    return cfg


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:               # 400/422: a bad query; the body says why
        return json.loads(e.read())


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus on loopback; yields (its port, the scrape base port its config names)."""
    if not PROMETHEUS.exists():
        pytest.skip(f"{PROMETHEUS} not installed (Debian: apt-get install prometheus)")
    port = free_port()
    base = free_base(avoid=(port,))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(base)))
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        yield port, base
    finally:
        stop(proc)


def queries() -> dict[str, str]:
    """label -> PromQL: the dashboard's queries, every recording rule's expression, and
    every alert's expression in its bool form (with_bool)."""
    qs = {f"dashboard {title!r} {ref}": expr for title, ref, expr in dashboard_queries()}
    for rule in rules():
        if "record" in rule:
            qs[f"record {rule['record']}"] = rule["expr"]
        else:
            qs[f"alert {rule['alert']} (bool form)"] = with_bool(rule["expr"])
    return qs


def not_ready(vector: list[dict]) -> str:
    """Why an instant query's result does not yet show a running 2-rank job ('' if it does):
    no series; a NaN (a rate ratio over a window with no steps, 0/0); or a per-rank
    result that lacks a rank (its target not scraped twice yet)."""
    if not vector:
        return "no data"
    if not all(math.isfinite(float(v["value"][1])) for v in vector):
        return "not finite"
    ranks = {v["metric"]["rank"] for v in vector if "rank" in v["metric"]}
    if ranks and ranks != {str(r) for r in range(NPROC)}:
        return f"only ranks {sorted(ranks)}"
    return ""


@pytest.mark.slow
def test_prometheus_evaluates_every_dashboard_query_and_rule_on_a_live_run(tmp_path, prometheus, jobs):
    prom_port, base = prometheus
    # Trains until stopped: the rate windows need steps, not a lingering endpoint.
    job = jobs(tmp_path, base, "--layers", "32,64,64,1", "--global-batch-size", "64", "--lr", "1e-4",
               "--max-steps", "10000000", "--log-every", "5", "--eval-every", "50", "--progress", "none",
               name="run")
    alerts = {rule["alert"]: rule["expr"] for rule in rules() if "alert" in rule}
    qs = queries()
    started = time.monotonic()
    deadline = started + 90
    # Every query, in one round, until a round where each has data for the whole run.
    while True:
        assert job.proc.poll() is None, f"the run exited ({job.proc.returncode}):\n{job.tail()}"
        results, missing = {}, {}
        for label, expr in qs.items():
            reply = api(prom_port, "query", query=expr)
            assert reply["status"] == "success", f"{label}: {expr}\n{reply}"
            vector = reply["data"]["result"]
            why = not_ready(vector)
            if why:
                missing[label] = f"{why}: {expr}"
            else:
                results[label] = vector
        if not missing:
            break
        assert time.monotonic() < deadline, (
            "not every query had data within 90 s:\n" + "\n".join(f"  {k}: {v}" for k, v in missing.items())
            + f"\nrun log:\n{job.tail(1500)}")
        time.sleep(1)
    print(f"{len(results)} queries had data {time.monotonic() - started:.1f} s after the run started")
    for label, vector in results.items():
        print(f"  {label}: {[(v['metric'].get('rank', ''), v['value'][1]) for v in vector]}")
    # Both ranks were stepping in that round.
    rates = results["record rank:ddp_fnn_steps:rate15s"]
    assert len(rates) == NPROC and all(float(v["value"][1]) > 0 for v in rates)
    since = results["dashboard 'Seconds since last step' A"]
    assert len(since) == NPROC and all(float(v["value"][1]) < 30 for v in since)

    # The alerts themselves are valid queries (empty unless firing).
    for name, expr in alerts.items():
        reply = api(prom_port, "query", query=expr)
        assert reply["status"] == "success", f"alert {name}: {reply}"
    # Prometheus evaluated every rule file's rules without an error.
    groups = api(prom_port, "rules")["data"]["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(evaluated) == {r.get("record") or r["alert"] for r in rules()}
    for name, r in evaluated.items():
        assert r["health"] == "ok" and not r.get("lastError"), f"{name}: {r}"
    # A few values the run fixes exactly.
    world = api(prom_port, "query", query='ddp_fnn_world_size{job="ddp-fnn-local"}')["data"]["result"]
    assert sorted(v["metric"]["rank"] for v in world) == ["0", "1"]
    assert all(float(v["value"][1]) == NPROC for v in world)
    # At N = 2 the ring sends the payload: the two counters are equal, give or take the
    # one step a scrape can land in the middle of (see scrape_finished).
    diff = api(prom_port, "query", query="ddp_fnn_allreduce_wire_bytes_total"
                                         " - ddp_fnn_allreduce_payload_bytes_total")["data"]["result"]
    grad = float(results["dashboard 'Gradient size' A"][0]["value"][1])
    assert 2 * (NPROC - 1) / NPROC == 1
    assert len(diff) == NPROC and all(float(v["value"][1]) in (0.0, grad, -grad) for v in diff), diff
    up = api(prom_port, "query", query="up")["data"]["result"]
    assert sorted((v["metric"]["instance"], v["value"][1]) for v in up) == [
        (f"127.0.0.1:{base + r}", "1") for r in range(NPROC)]


def alerts(port: int, name: str) -> list[dict]:
    """The active (pending or firing) alerts of that name, from a real Prometheus."""
    return [a for a in api(port, "alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]


@pytest.mark.slow
def test_real_prometheus_fires_the_straggler_alert_for_an_injected_straggler(tmp_path, prometheus, jobs):
    """--slow-rank 1 --slow-ms 20: rank 1 is the last one ready in every step and rank 0
    waits most of its step; DdpFnnStraggler (for: 30 s) fires, naming rank 1."""
    prom_port, base = prometheus
    job = jobs(tmp_path, base, *STRAGGLER_RUN, "--slow-rank", "1", "--slow-ms", "20", name="straggler")
    deadline = time.monotonic() + 150
    while True:
        assert job.proc.poll() is None, f"the run exited ({job.proc.returncode}):\n{job.tail()}"
        firing = [a for a in alerts(prom_port, "DdpFnnStraggler") if a["state"] == "firing"]
        if firing:
            break
        assert time.monotonic() < deadline, f"DdpFnnStraggler did not fire in 150 s: {alerts(prom_port, 'DdpFnnStraggler')}"
        time.sleep(1)
    assert [a["labels"]["rank"] for a in firing] == ["1"]


@pytest.mark.slow
def test_real_prometheus_keeps_the_straggler_alert_quiet_for_a_clean_run(tmp_path, prometheus, jobs):
    """The same settings without the straggler: for as long as the alert would need to
    fire (15 s of windows + 30 s of `for`, and then some), it is never even pending,
    while the peer figures it reads are there."""
    prom_port, base = prometheus
    job = jobs(tmp_path, base, *STRAGGLER_RUN, name="clean")
    seen = False
    end = time.monotonic() + 75
    while time.monotonic() < end:
        assert job.proc.poll() is None, f"the run exited ({job.proc.returncode}):\n{job.tail()}"
        assert alerts(prom_port, "DdpFnnStraggler") == []
        ratio = api(prom_port, "query", query="rank:ddp_fnn_last_ready:ratio30s")["data"]["result"]
        seen = seen or len(ratio) == NPROC
        time.sleep(1)
    assert seen, "the last-ready ratio never had both ranks"


# Tiny and quick (about a millisecond of compute a step): in a clean run who is last
# ready is a coin toss; with 20 ms of injected delay it is always rank 1.
STRAGGLER_RUN = ("--layers", "32,64,64,1", "--global-batch-size", "64", "--max-steps", "10000000",
                 "--log-every", "5", "--progress", "none", "--no-probe")
