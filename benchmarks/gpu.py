"""ddp-fnn on one CUDA GPU: is the clock right, what does the trainer reach, what does the
per-step NaN check cost. One script, one run, four parts, each in its own subprocess with
its own timeout (a part that fails, hangs or crashes is recorded and the rest still run).

Run from the repository root (ddp-fnn need not be installed; PYTHONPATH=. is enough):

    PYTHONPATH=. OMP_NUM_THREADS=4 python3 -u benchmarks/gpu.py --out OUT        # on the GPU
    launch/gpu.sh OUT                                                              # the same, sized < 7 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu.py --out /tmp/g --device cpu --quick   # smoke test

It writes OUT/gpu.json (strict JSON via ddp_fnn.fileio: a missing or non-finite
figure is null), OUT/gpu.md (the same as tables), OUT/logs/ (every subprocess's stdout
and stderr) and OUT/artifacts/ (summary.json, step files, the profiler trace, gzipped).
gpu.json and gpu.md are rewritten after every part, so a run killed from outside still
leaves what was done. Exit status 0 when every part ran (whatever its figures), 1 otherwise.

env  Device name, compute capability, torch, CUDA, cuDNN and NCCL versions, nvidia-smi's
     clocks and power limit.

a.   World size 1 on NCCL under torchrun (`python3 -m torch.distributed.run --standalone
     --nproc-per-node 1 -m ddp_fnn train --device cuda --backend nccl ...`): ~100 steps of
     a mid-size FNN (fp32). Checks: exit 0; summary.json and steps-rank0.jsonl exist (one
     line a step); every step's data, forward, backward and optimizer times > 0 (comm > 0
     where the step all-reduced); data + forward + backward + sync wait + optimizer equals
     the step time within 5 % (sync wait = sync_end_s - sync_start_s: exposed comm plus
     DDP's tail). Records summary.json's step time, throughput and MFU, and what /metrics
     served after the last step (the run lingers a few seconds for the scrape).

b.   The clock against torch.profiler. ddp-fnn's own training loop runs in-process
     (trainer.main, world size 1, NCCL over an in-process store, exactly what `ddp-fnn
     train` runs), with CUPTI tracing (ProfilerActivity.CUDA) switched on for a range of
     steps. Nothing in ddp_fnn/ is changed: this process wraps two methods of
     observe.Observer at runtime: ``begin_step`` (starts and stops the profiler at step
     boundaries, after a device synchronise) and ``phase`` (puts each phase inside a
     ``record_function("ddp_fnn.<phase>")`` annotation). Chosen over timing a copy of
     the loop because the figures compared must be the trainer's own (its step file,
     from its CUDA events), not a re-implementation's. Each GPU kernel, memcpy and memset
     in the exported Chrome trace is attributed to the phase during whose annotation its
     launch (the CUDA runtime/driver call with the same correlation id) happened, on
     whatever thread: backward's kernels are launched by the autograd engine's device
     thread, not the thread that holds the annotation, so the profiler's own parent/child
     trees (FunctionEvent.device_time_total) would miss them. Per phase it reports
     ddp-fnn's seconds (sum over the profiled steps, from the step file) over the kernel
     seconds launched in that phase: target 0.9..1.1 for forward, backward and optimizer.
     Backward is compared twice: the whole backward() call (ddp-fnn: backward + sync
     wait) against every kernel launched in it, and compute only (ddp-fnn's backward_s,
     which ends at the last bucket's hand-over) against the kernels launched before the
     last all-reduce call. The data phase is reported, not judged: it is mostly host work
     (the batch gathered with numpy), during which the GPU waits. As a cross-check the
     kernel total is also read from key_averages() (self_device_time_total, or
     self_cuda_time_total on older torch).

c.   bf16 throughput and MFU of a wide FNN (256,8192x5,256: 272 M weights; global batch
     8192): ddp-fnn train --precision bf16 under torchrun at world size 1; MFU against
     ddp_fnn/observe/mfu.py's dense bf16 peak for the device name (the table entry used is
     printed), from summary.json (every step, the first included) and from the median
     step after warm-up. Then, in-process, the same model in a plain PyTorch loop (data
     already on the GPU, bf16 autocast, SGD with momentum, no DDP, no observer, no host
     sync): eager, eager with a per-step `bool(torch.isfinite(loss))`, and
     torch.compile(model); and one 8192^3 bf16 matmul, the ceiling cuBLAS reaches on this
     device. Target: MFU >= 60 % of the dense peak; the phase shares of the trainer's step
     and the plain loops say what limits it.

d.   What the per-step NaN check costs. trainer.py checks each micro-step's loss with
     ``bool(torch.isfinite(loss.detach()))``, which waits for the GPU to finish the forward
     pass before backward is launched. The trainer is run in-process, alternating (order
     rotated each round) three variants: ``every`` (unchanged), ``deferred`` (step k's flag
     is copied to pinned memory without waiting and checked at step k+1, after an event
     that has completed by then: the change proposed for trainer.py) and ``off`` (no
     check). The variants are made by shadowing the name ``bool`` in ddp_fnn.train.loop's
     module namespace for the run (tensors only; anything else goes to the builtin);
     trainer.py itself is untouched. Medians of the host's step interval (consecutive
     steps' start_s) and of the step time ddp-fnn records, after warm-up; ratio every /
     deferred (> 1: the check costs that much). Models small enough that a sync matters
     (GPU time per step comparable to the host's launch time).

Sizes (--quick: tiny ones, for a CPU smoke test with Gloo) and time limits are set in
SIZES and TIMEOUTS below; --budget-s bounds the whole run (a part gets at most what is
left, minus a reserve, and is skipped when under --min-part-s remains).
"""

from __future__ import annotations

import argparse
import bisect
import builtins
import contextlib
import gzip
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(REPO))

from ddp_fnn.observe import mfu as mfu_table  # noqa: E402  (no torch import: a table and two functions)
from ddp_fnn import fileio  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")
TARGET_SUM = 0.05          # a: phases add up to the step within 5 %
TARGET_PROFILER = 0.10     # b: ddp-fnn's phase times within 10 % of the kernel time
TARGET_MFU = 0.60          # c: of the dense bf16 peak

SIZES = {
    "full": {
        # a and b: a mid-size FNN in fp32 (20 M weights a layer pair; ~1 TFLOP a step)
        "mid_layers": "1024,4096,4096,4096,1024", "mid_batch": 4096, "mid_samples": 65536,
        "a_steps": 100, "b_steps": 40, "b_from": 21, "b_to": 30, "mid_lr": 1e-6,
        # c: a wide FNN in bf16
        "wide_layers": "256,8192,8192,8192,8192,8192,256", "wide_batch": 8192, "wide_samples": 40960,
        "c_steps": 40, "c_skip": 5, "wide_lr": 1e-6, "plain_warmup": 5, "plain_steps": 10, "plain_repeats": 3,
        "gemm_n": 8192,
        # d: models where a host sync per step matters
        "d_models": "512,2048,2048,2048,512@1024;256,1024,1024,256@256", "d_steps": 200, "d_skip": 20,
        "d_rounds": 3, "d_lr": 1e-5,
    },
    "quick": {
        "mid_layers": "16,64,64,4", "mid_batch": 64, "mid_samples": 1024,
        "a_steps": 12, "b_steps": 10, "b_from": 4, "b_to": 6, "mid_lr": 1e-3,
        "wide_layers": "16,128,128,128,4", "wide_batch": 128, "wide_samples": 1024,
        "c_steps": 8, "c_skip": 2, "wide_lr": 1e-3, "plain_warmup": 2, "plain_steps": 3, "plain_repeats": 2,
        "gemm_n": 256,
        "d_models": "16,64,64,4@64", "d_steps": 30, "d_skip": 5, "d_rounds": 2, "d_lr": 1e-3,
    },
}

# Seconds each part may take at most (the budget may give it less).
TIMEOUTS = {"env": 90, "a": 150, "b": 150, "c_train": 120, "c_plain": 200, "d": 150}
ORDER = ("env", "a", "c_train", "b", "d", "c_plain")   # c's torch.compile last: the likeliest to run long


# =======================================================================================
# small helpers
# =======================================================================================

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _tail(path: Path, n: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:]


def _write_json(path: Path, value) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(fileio.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    return fileio.loads(path.read_text())


def _read_steps(path: Path) -> list[dict]:
    return [fileio.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(threads: str | None = None) -> dict:
    """The environment of every subprocess: the repo importable, unbuffered, and no
    torchrun variables inherited (a worker run in-process must be rank 0 of 1)."""
    env = dict(os.environ)
    for k in list(env):
        if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT") or k.startswith("TORCHELASTIC_"):
            del env[k]
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", threads or "4")
    return env


def _kill_group(p: subprocess.Popen) -> None:
    """End the subprocess and everything it started (it leads its own session)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_RUNNING: list = []     # the subprocess now running (killed with its group if this script is stopped)


def _on_signal(signum, _frame):
    for p in list(_RUNNING):
        _kill_group(p)
    raise SystemExit(128 + signum)


def run_cmd(cmd: list[str], timeout: float, log: Path, poll=None) -> dict:
    """Run ``cmd`` from the repo root with stdout/stderr to ``log``.out/.err; kill its
    process group after ``timeout`` seconds. ``poll()`` is called twice a second."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    out_p, err_p = Path(str(log) + ".out"), Path(str(log) + ".err")
    with open(out_p, "w") as fo, open(err_p, "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=REPO, env=_child_env(), start_new_session=True)
        _RUNNING.append(p)
        try:
            rc, timed_out = _wait(p, timeout, t0, poll)
        finally:
            _RUNNING.remove(p)
    return {"cmd": " ".join(cmd), "rc": rc, "timed_out": timed_out, "wall_s": time.monotonic() - t0,
            "stdout_log": str(out_p), "stderr_log": str(err_p),
            "stderr_tail": _tail(err_p) if (rc != 0 or timed_out) else _tail(err_p, 600)}


def _wait(p: subprocess.Popen, timeout: float, t0: float, poll) -> tuple[int, bool]:
    """Wait for ``p``, calling ``poll`` twice a second; kill its group after ``timeout``."""
    timed_out = False
    while True:
        try:
            rc = p.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if poll is not None:
            try:
                poll()
            except Exception:                # a failed poll must not stop the part
                pass
        if time.monotonic() - t0 > timeout:
            timed_out = True
            _kill_group(p)
            rc = p.wait()
            break
    return rc, timed_out


def run_worker(name: str, config: dict, timeout: float, work: Path, logs: Path) -> tuple[dict, dict]:
    """This script as a subprocess running worker ``name``; returns (its result, the run).
    A worker writes its result file after every measurement, so a timeout keeps what it
    had finished."""
    cfg_path, out_path = work / f"{name}.config.json", work / f"{name}.result.json"
    _write_json(cfg_path, config)
    if out_path.exists():
        out_path.unlink()
    proc = run_cmd([sys.executable, "-u", str(SCRIPT), "--worker", name, "--worker-config", str(cfg_path),
                    "--worker-out", str(out_path)], timeout, logs / name)
    result = {}
    if out_path.exists():
        try:
            result = _read_json(out_path)
        except ValueError as e:
            result = {"error": f"unreadable worker result: {e}"}
    return result, proc


def torchrun_cmd(train_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "ddp_fnn", "train", *train_args]


def train_args(device: str, backend: str, layers: str, batch: int, samples: int, steps: int, lr: float,
               output: Path, precision: str = "fp32", log_every: int = 10, extra=()) -> list[str]:
    return ["--device", device, "--backend", backend, "--layers", layers, "--global-batch-size", str(batch),
            "--samples", str(samples), "--max-steps", str(steps), "--lr", str(lr), "--precision", precision,
            "--no-probe", "--progress", "json", "--log-every", str(log_every), "--output", str(output),
            "--resume", "never", *extra]


def flops_per_sample(layers: str) -> int:
    return mfu_table.train_flops_per_sample([int(w) for w in layers.split(",")])


def peak_entry(device_name: str | None, precision: str) -> dict:
    """ddp_fnn/observe/mfu.py's peak for this device, and which table entry gave it."""
    if not device_name:
        return {"device": device_name, "precision": precision, "entry": None, "peak_flops": None}
    for fragment, peaks in mfu_table.PEAK_FLOPS.items():     # the same search as mfu.peak_flops
        if fragment in device_name:
            note = None
            if fragment == "H200" and "NVL" in device_name:
                note = ("an H200 NVL's data-sheet dense bf16 peak is lower (about 835 TFLOP/s) than the SXM "
                        "figure the table holds: MFU here is understated by that factor")
            return {"device": device_name, "precision": precision, "entry": fragment,
                    "peak_flops": peaks.get(precision), "note": note}
    return {"device": device_name, "precision": precision, "entry": None, "peak_flops": None}


# =======================================================================================
# step-file analysis (parts a, c, d)
# =======================================================================================

def sync_wait(rec: dict) -> float:
    return max(0.0, rec["sync_end_s"] - rec["sync_start_s"])


def phase_sum(rec: dict) -> float:
    return sum(rec[f"{p}_s"] for p in PHASES) + sync_wait(rec)


def analyse_steps(recs: list[dict], skip: int = 1) -> dict:
    """Per-phase figures over the steps after the first ``skip`` (all if too few)."""
    use = recs[skip:] if len(recs) > skip else recs
    out = {"steps_used": len(use), "first_step_used": use[0]["step"] if use else None}
    for key in ("step_s", *(f"{p}_s" for p in PHASES), "comm_s", "exposed_s", "tail_s"):
        out[f"{key}_median"] = _median([r[key] for r in use])
    out["sync_wait_s_median"] = _median([sync_wait(r) for r in use])
    sums = [phase_sum(r) for r in use]
    steps = [r["step_s"] for r in use]
    out["phase_sum_s_total"] = sum(sums)
    out["step_s_total"] = sum(steps)
    out["phase_sum_over_step"] = _ratio(sum(sums), sum(steps))
    per = [s / t for s, t in zip(sums, steps) if t > 0]
    out["phase_sum_over_step_per_step"] = {"min": min(per) if per else None, "median": _median(per),
                                           "max": max(per) if per else None}
    med = out["step_s_median"]
    out["shares_of_median_step"] = ({p: _ratio(out[f"{p}_s_median"], med) for p in PHASES}
                                    | {"sync_wait": _ratio(out["sync_wait_s_median"], med)})
    starts = [r["start_s"] for r in use]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    out["host_interval_s_median"] = _median(gaps)
    return out


def check_phases(recs: list[dict]) -> dict:
    """Every step's four phases > 0, comm > 0 where the step all-reduced."""
    mins = {p: min((r[f"{p}_s"] for r in recs), default=None) for p in PHASES}
    synced = [r for r in recs if r.get("calls", 0) > 0]
    mins["comm"] = min((r["comm_s"] for r in synced), default=None)
    mins["sync_wait"] = min((sync_wait(r) for r in recs), default=None)
    bad = [p for p in PHASES if mins[p] is None or mins[p] <= 0]
    if synced and (mins["comm"] is None or mins["comm"] <= 0):
        bad.append("comm")
    return {"min_s": mins, "steps_with_allreduce": len(synced), "all_positive": not bad, "not_positive": bad}


def _parse_prometheus(text: str) -> dict:
    keep = ("ddp_fnn_mfu_ratio", "ddp_fnn_step_duration_seconds_sum", "ddp_fnn_step_duration_seconds_count",
            "ddp_fnn_steps_total", "ddp_fnn_samples_total", "ddp_fnn_phase_duration_seconds_sum",
            "ddp_fnn_phase_duration_seconds_count", "ddp_fnn_gradient_bytes", "ddp_fnn_world_size",
            "ddp_fnn_allreduce_calls_total")
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in keep:
            key, _, value = line.rpartition(" ")
            try:
                found[key] = float(value)
            except ValueError:
                pass
    return found


# =======================================================================================
# the driver's parts
# =======================================================================================

class Driver:
    def __init__(self, args):
        self.args = args
        self.sizes = dict(SIZES["quick" if args.quick else "full"])
        for kv in args.set or []:
            k, _, v = kv.partition("=")
            if k not in self.sizes:
                raise SystemExit(f"--set {kv}: unknown size {k!r} (known: {', '.join(self.sizes)})")
            self.sizes[k] = type(self.sizes[k])(v)
        self.device = args.device
        self.backend = "nccl" if args.device == "cuda" else "gloo"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logs = self.out / "logs"
        self.art = self.out / "artifacts"
        self.logs.mkdir(exist_ok=True)
        self.art.mkdir(exist_ok=True)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ddp-fnn-gpu-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.results = {"script": "benchmarks/gpu.py", "argv": sys.argv[1:], "device": self.device,
                        "backend": self.backend, "quick": args.quick, "sizes": self.sizes,
                        "targets": {"phase_sum": TARGET_SUM, "profiler": TARGET_PROFILER, "mfu": TARGET_MFU},
                        "host": {"python": platform.python_version(), "hostname": platform.node(),
                                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                        "parts": {}}

    # ---- bookkeeping ------------------------------------------------------------------
    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        self.results["elapsed_s"] = time.monotonic() - self.t0
        _write_json(self.out / "gpu.json", self.results)
        (self.out / "gpu.md").write_text(render_markdown(self.results))

    def run(self, parts: list[str]) -> int:
        try:
            return self._run(parts)
        finally:
            if not self.args.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self, parts: list[str]) -> int:
        ok = True
        for name in ORDER:
            if name not in parts:
                continue
            timeout = min(TIMEOUTS[name] * (self.args.timeout_scale or 1.0), self.remaining() - self.args.reserve_s)
            if timeout < self.args.min_part_s:
                res = {"ran": False, "passed": None, "skipped": f"budget: {self.remaining():.0f} s left of --budget-s"}
            else:
                print(f"\n=== part {name} (timeout {timeout:.0f} s, {self.remaining():.0f} s of budget left) ===",
                      flush=True)
                t = time.monotonic()
                try:
                    res = getattr(self, f"part_{name}")(timeout)
                except Exception as e:                     # a bug in the driver's own analysis
                    res = {"ran": False, "passed": None, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()}
                res["part_wall_s"] = time.monotonic() - t
            self.results["parts"][name] = res
            ok = ok and bool(res.get("ran"))
            self.save()
            print(render_part(name, res), flush=True)
        print(f"\nwrote {self.out / 'gpu.json'} and {self.out / 'gpu.md'} ({time.monotonic() - self.t0:.0f} s)")
        return 0 if ok else 1

    def _copy(self, src: Path, name: str, gz: bool = False) -> str | None:
        if not src.exists():
            return None
        dst = self.art / (name + (".gz" if gz else ""))
        if gz:
            with open(src, "rb") as fi, gzip.open(dst, "wb") as fo:
                shutil.copyfileobj(fi, fo)
        else:
            shutil.copyfile(src, dst)
        return str(dst.relative_to(self.out))

    # ---- env ----------------------------------------------------------------------------
    def part_env(self, timeout: float) -> dict:
        res, proc = run_worker("env", {"device": self.device}, timeout, self.work, self.logs)
        res["run"] = proc
        res["ran"] = proc["rc"] == 0 and "error" not in res
        res["passed"] = None
        self.device_name = res.get("device_name")
        self.results["device_name"] = self.device_name
        if shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                    "clocks.sm,power.limit,pstate,temperature.gpu", "--format=csv"],
                                   capture_output=True, text=True, timeout=20)
                res["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
            except (OSError, subprocess.TimeoutExpired) as e:
                res["nvidia_smi"] = f"failed: {e}"
        return res

    # ---- a ------------------------------------------------------------------------------
    def part_a(self, timeout: float) -> dict:
        s = self.sizes
        out = self.work / "a"
        port = _free_port()
        args = train_args(self.device, self.backend, s["mid_layers"], s["mid_batch"], s["mid_samples"],
                          s["a_steps"], s["mid_lr"], out,
                          extra=["--metrics-port", str(port), "--metrics-linger", "4"])
        scraped = {}

        def poll():
            if "text" not in scraped and (out / "summary.json").exists():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    scraped["text"] = r.read().decode()

        proc = run_cmd(torchrun_cmd(args), timeout, self.logs / "a_train", poll=poll)
        res = {"run": proc, "layers": s["mid_layers"], "global_batch_size": s["mid_batch"], "steps": s["a_steps"],
               "backend": self.backend, "checks": {"exit_0": proc["rc"] == 0 and not proc["timed_out"]}}
        summary_p, steps_p = out / "summary.json", out / "steps-rank0.jsonl"
        res["checks"]["summary_json_exists"] = summary_p.exists()
        res["checks"]["steps_file_exists"] = steps_p.exists()
        res["artifacts"] = [self._copy(summary_p, "a_summary.json"), self._copy(steps_p, "a_steps-rank0.jsonl")]
        if summary_p.exists():
            summ = _read_json(summary_p)
            res["summary"] = {k: summ.get(k) for k in (
                "device", "backend", "world_size", "parameters", "steps", "samples_per_second", "step_time_p50_s",
                "step_time_p95_s", "step_time_mean_s", "comm_time_per_step_s", "exposed_comm_time_per_step_s",
                "sync_tail_per_step_s", "allreduce_payload_bytes_per_step", "mfu", "wall_time_s", "final_train_loss")}
            peak = peak_entry(self.results.get("device_name"), "fp32")
            res["mfu_peak"] = peak
        if scraped.get("text"):
            (self.art / "a_metrics.txt").write_text(scraped["text"])
            m = _parse_prometheus(scraped["text"])
            res["metrics"] = m
            s_sum = next((v for k, v in m.items() if k.startswith("ddp_fnn_step_duration_seconds_sum")), None)
            s_cnt = next((v for k, v in m.items() if k.startswith("ddp_fnn_step_duration_seconds_count")), None)
            res["metrics_step_mean_s"] = _ratio(s_sum, s_cnt)
        res["checks"]["metrics_scraped"] = bool(scraped.get("text"))
        if steps_p.exists():
            recs = _read_steps(steps_p)
            res["checks"]["steps_file_lines"] = len(recs)
            res["checks"]["one_line_per_step"] = [r["step"] for r in recs] == list(range(1, s["a_steps"] + 1))
            ph = check_phases(recs)
            res["phases_positive"] = ph
            res["checks"]["phases_positive"] = ph["all_positive"]
            an = analyse_steps(recs, skip=1)
            res["analysis"] = an
            ratio = an["phase_sum_over_step"]
            med = an["phase_sum_over_step_per_step"]["median"]
            res["checks"]["phase_sum_within_5pct"] = (ratio is not None and abs(ratio - 1) <= TARGET_SUM
                                                      and med is not None and abs(med - 1) <= TARGET_SUM)
        res["ran"] = bool(res["checks"]["exit_0"])
        res["passed"] = all(v for k, v in res["checks"].items() if isinstance(v, bool) and k != "metrics_scraped")
        return res

    # ---- b ------------------------------------------------------------------------------
    def part_b(self, timeout: float) -> dict:
        s = self.sizes
        cfg = {"device": self.device, "backend": self.backend, "layers": s["mid_layers"], "batch": s["mid_batch"],
               "samples": s["mid_samples"], "steps": s["b_steps"], "lr": s["mid_lr"], "from": s["b_from"],
               "to": s["b_to"], "output": str(self.work / "b")}
        res, proc = run_worker("profile", cfg, timeout, self.work, self.logs)
        res["run"] = proc
        trace = self.work / "b" / "trace.json"
        res["artifacts"] = [self._copy(trace, "b_trace.json", gz=True),
                            self._copy(self.work / "b" / "steps-rank0.jsonl", "b_steps-rank0.jsonl")]
        res["ran"] = proc["rc"] == 0 and not proc["timed_out"] and "error" not in res and "compare" in res
        res["passed"] = res.get("all_judged_within_10pct") if res["ran"] else None
        return res

    # ---- c ------------------------------------------------------------------------------
    def part_c_train(self, timeout: float) -> dict:
        s = self.sizes
        out = self.work / "c"
        args = train_args(self.device, self.backend, s["wide_layers"], s["wide_batch"], s["wide_samples"],
                          s["c_steps"], s["wide_lr"], out, precision="bf16", extra=["--metrics-port", "0"])
        proc = run_cmd(torchrun_cmd(args), timeout, self.logs / "c_train", poll=None)
        (out / "model.pt").unlink(missing_ok=True)
        res = {"run": proc, "layers": s["wide_layers"], "global_batch_size": s["wide_batch"], "steps": s["c_steps"],
               "precision": "bf16"}
        res["artifacts"] = [self._copy(out / "summary.json", "c_summary.json"),
                            self._copy(out / "steps-rank0.jsonl", "c_steps-rank0.jsonl")]
        fps = flops_per_sample(s["wide_layers"])
        peak = peak_entry(self.results.get("device_name"), "bf16")
        res["flops_per_sample"] = fps
        res["peak"] = peak
        if (out / "summary.json").exists():
            summ = _read_json(out / "summary.json")
            res["summary"] = {k: summ.get(k) for k in ("device", "parameters", "samples_per_second",
                                                       "step_time_p50_s", "step_time_mean_s", "mfu")}
            res["mfu_summary"] = summ.get("mfu")
        if (out / "steps-rank0.jsonl").exists():
            recs = _read_steps(out / "steps-rank0.jsonl")
            an = analyse_steps(recs, skip=s["c_skip"])
            res["analysis"] = an
            med = an["step_s_median"]
            res["tflops_steady"] = fps * s["wide_batch"] / med / 1e12 if med else None
            res["mfu_steady"] = (fps * s["wide_batch"] / med / peak["peak_flops"]
                                 if med and peak["peak_flops"] else None)
            res["mfu_target_met"] = (res["mfu_steady"] >= TARGET_MFU) if res["mfu_steady"] is not None else None
        res["ran"] = proc["rc"] == 0 and not proc["timed_out"] and "analysis" in res
        res["passed"] = res.get("mfu_target_met")
        return res

    def part_c_plain(self, timeout: float) -> dict:
        s = self.sizes
        cfg = {"device": self.device, "layers": s["wide_layers"], "batch": s["wide_batch"], "lr": s["wide_lr"],
               "warmup": s["plain_warmup"], "steps": s["plain_steps"], "repeats": s["plain_repeats"],
               "gemm_n": s["gemm_n"], "compile": not self.args.no_compile}
        res, proc = run_worker("plain", cfg, timeout, self.work, self.logs)
        res["run"] = proc
        fps = flops_per_sample(s["wide_layers"])
        peak = peak_entry(self.results.get("device_name"), "bf16")
        res["peak"] = peak
        for v in res.get("variants", {}).values():
            st = v.get("step_s_median")
            v["tflops"] = fps * s["wide_batch"] / st / 1e12 if st else None
            v["mfu"] = fps * s["wide_batch"] / st / peak["peak_flops"] if st and peak["peak_flops"] else None
        g = res.get("gemm")
        if g and g.get("tflops") and peak["peak_flops"]:
            g["of_peak"] = g["tflops"] * 1e12 / peak["peak_flops"]
        tr = self.results["parts"].get("c_train", {})
        trainer_step = (tr.get("analysis") or {}).get("step_s_median")
        var = res.get("variants", {})
        res["comparison"] = {name: {"step_s": v.get("step_s_median"),
                                    "trainer_over_this": _ratio(trainer_step, v.get("step_s_median"))}
                             for name, v in var.items()}
        timed = {n: v["step_s_median"] for n, v in var.items() if v.get("step_s_median")}
        res["fastest"] = min(timed, key=timed.get) if timed else None
        if var.get("eager", {}).get("step_s_median") and var.get("compiled", {}).get("step_s_median"):
            res["compiled_speedup_over_eager"] = var["eager"]["step_s_median"] / var["compiled"]["step_s_median"]
        res["limits"] = limits_text(tr, res)
        res["ran"] = proc["rc"] == 0 and not proc["timed_out"] and "error" not in res
        res["passed"] = None
        return res

    # ---- d ------------------------------------------------------------------------------
    def part_d(self, timeout: float) -> dict:
        s = self.sizes
        models = []
        for spec in s["d_models"].split(";"):
            layers, _, batch = spec.partition("@")
            models.append({"layers": layers, "batch": int(batch)})
        cfg = {"device": self.device, "backend": self.backend, "models": models, "steps": s["d_steps"],
               "skip": s["d_skip"], "rounds": s["d_rounds"], "lr": s["d_lr"], "output": str(self.work / "d")}
        res, proc = run_worker("nancheck", cfg, timeout, self.work, self.logs)
        res["run"] = proc
        res["ran"] = proc["rc"] == 0 and not proc["timed_out"] and "error" not in res and bool(res.get("models"))
        res["passed"] = None
        return res


def limits_text(train: dict, plain: dict) -> list[str]:
    """What keeps the trainer's bf16 MFU below the target, from the figures at hand."""
    out = []
    an = train.get("analysis") or {}
    med = an.get("step_s_median")
    if med:
        sh = an.get("shares_of_median_step") or {}
        parts = ", ".join(f"{k} {v * 100:.1f} %" for k, v in sh.items() if v is not None)
        out.append(f"trainer step {med * 1e3:.2f} ms (median after warm-up): {parts}")
    g = plain.get("gemm") or {}
    if g.get("of_peak"):
        out.append(f"one {g.get('n')}^3 bf16 matmul reaches {g['tflops']:.0f} TFLOP/s = {g['of_peak'] * 100:.1f} % "
                   f"of the table's peak: no FNN step can do better than that")
    var = plain.get("variants") or {}
    for name in ("eager", "eager_sync", "compiled"):
        v = var.get(name) or {}
        if v.get("mfu") is not None:
            out.append(f"plain {name}: {v['step_s_median'] * 1e3:.2f} ms/step, MFU {v['mfu'] * 100:.1f} %")
    if med and (var.get("eager") or {}).get("step_s_median"):
        e = var["eager"]["step_s_median"]
        out.append(f"the trainer's step is {med / e:.2f}x the plain eager loop's ({(med - e) * 1e3:.2f} ms more: "
                   f"host data fetch and copy, DDP bucket copies, the NaN check's sync, the observer)")
    return out


# =======================================================================================
# workers (each runs in its own subprocess)
# =======================================================================================

class Emitter:
    """A worker's result, rewritten to its file after every measurement."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        self.flush()

    def __getitem__(self, key):
        return self.data[key]

    def flush(self):
        _write_json(self.path, self.data)


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def worker_env(cfg: dict, em: Emitter) -> None:
    import torch
    import torch.distributed as dist
    em["python"] = platform.python_version()
    em["torch"] = torch.__version__
    em["cuda"] = torch.version.cuda
    em["cuda_available"] = torch.cuda.is_available()
    if cfg["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        em["device_name"] = torch.cuda.get_device_name(0)
        em["capability"] = list(torch.cuda.get_device_capability(0))
        em["sm_count"] = p.multi_processor_count
        em["memory_gib"] = p.total_memory / 2 ** 30
        em["device_count"] = torch.cuda.device_count()
        em["cudnn"] = torch.backends.cudnn.version()
        try:
            v = torch.cuda.nccl.version()
            em["nccl"] = ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
        except Exception as e:
            em["nccl"] = f"unknown ({e})"
        em["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        em["device_name"] = None
    em["nccl_available"] = dist.is_nccl_available()
    em["gloo_available"] = dist.is_gloo_available()
    try:
        import triton
        em["triton"] = triton.__version__
    except Exception as e:
        em["triton"] = f"not importable ({type(e).__name__})"
    em["cc"] = shutil.which("cc") or shutil.which("gcc")
    import sysconfig
    em["python_h"] = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))   # torch.compile


def _train_config(cfg: dict, output: Path, **over):
    from ddp_fnn.config import TrainConfig
    kw = dict(device=cfg["device"], backend=cfg["backend"], layers=cfg["layers"], global_batch_size=cfg["batch"],
              samples=cfg.get("samples", max(4 * cfg["batch"], 64)), max_steps=cfg["steps"], lr=cfg["lr"],
              output=output, metrics_port=0, progress="none", probe=False, resume="never")
    kw.update(over)
    return TrainConfig.of(**kw)


# ---- b: the trainer under the profiler -------------------------------------------------

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")


def _windows(events: list[dict], prefix: str) -> list[tuple[float, float, str]]:
    w = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"][len(prefix):])
         for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
         and str(e.get("name", "")).startswith(prefix)]
    return sorted(w)


def _top_level_ops(events: list[dict]) -> list[dict]:
    """CPU ops not inside another op of the same thread (the CPU smoke test's stand-in for
    kernels: each with its own start as its 'launch')."""
    by_tid: dict = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            by_tid.setdefault(e.get("tid"), []).append(e)
    out = []
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0))))
        end = -1.0
        for e in evs:
            if float(e["ts"]) >= end:
                out.append(e)
                end = float(e["ts"]) + float(e.get("dur", 0))
    return out


def attribute(events: list[dict], prefix: str = "ddp_fnn.", cpu_standin: bool = False,
              steps: tuple[int, int] | None = None, step_prefix: str = "ddp_fnn_step.") -> dict:
    """Device time (us) per phase: each GPU kernel/memcpy/memset goes to the annotation
    window (``prefix`` + phase) in which its launch call started; with ``cpu_standin``,
    top-level CPU ops stand in for kernels. Backward is also split at the window's last
    all-reduce call: kernels launched after it are the sync tail (DDP's copy-back).
    ``steps=(A, B)``: only the phase windows inside the step annotations
    ``step_prefix`` + A..B count (the profiler runs from a few steps earlier, so that its
    warm-up misses nothing that is compared); kernels launched elsewhere are 'outside'."""
    from ddp_fnn.observe import union_length   # the trainer's own interval union
    wins = _windows(events, prefix)
    step_wins = [w for w in _windows(events, step_prefix)
                 if steps is None or steps[0] <= int(w[2]) <= steps[1]]
    if steps is not None and step_wins:
        wins = [w for w in wins if any(a <= w[0] <= b for a, b, _ in step_wins)]
    starts = [w[0] for w in wins]
    launch_ts, ext_ts = {}, {}
    reduce_calls = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, args = e.get("cat"), e.get("args") or {}
        if cat in LAUNCH_CATS and "correlation" in args:
            launch_ts[args["correlation"]] = float(e["ts"])
        elif cat == "cpu_op":
            if "External id" in args:
                ext_ts.setdefault(args["External id"], float(e["ts"]))
            name = str(e.get("name", "")).lower()
            if "all_reduce" in name or "allreduce" in name:
                reduce_calls.append(float(e["ts"]))
    reduce_calls.sort()
    if cpu_standin:
        dev = [(e, float(e["ts"])) for e in _top_level_ops(events)]
    else:
        dev = []
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS:
                args = e.get("args") or {}
                t = launch_ts.get(args.get("correlation"))
                if t is None:
                    t = ext_ts.get(args.get("External id"))
                dev.append((e, t))
    step_starts = [w[0] for w in step_wins]

    def in_steps(t):
        if steps is None or not step_wins:
            return True
        k = bisect.bisect_right(step_starts, t) - 1
        return k >= 0 and t <= step_wins[k][1]

    per: dict = {}
    unmatched_us, outside_us, outside_steps_us, total = 0.0, 0.0, 0.0, 0.0
    busy = []
    nccl_us = 0.0
    for e, t in dev:
        dur = float(e.get("dur", 0))
        if t is None:
            unmatched_us += dur
            continue
        if not in_steps(t):
            outside_steps_us += dur
            continue
        total += dur
        busy.append((float(e["ts"]), float(e["ts"]) + dur))
        is_nccl = "nccl" in str(e.get("name", "")).lower()
        if is_nccl:
            nccl_us += dur
        i = bisect.bisect_right(starts, t) - 1
        if i < 0 or t > wins[i][1]:
            outside_us += dur
            continue
        a, b, phase = wins[i]
        d = per.setdefault(phase, {"device_us": 0.0, "events": 0, "nccl_us": 0.0})
        d["device_us"] += dur
        d["events"] += 1
        if is_nccl:
            d["nccl_us"] += dur
        if phase == "backward":
            j = bisect.bisect_right(reduce_calls, b) - 1
            last_reduce = reduce_calls[j] if j >= 0 and reduce_calls[j] >= a else None
            key = "after_last_allreduce_us" if last_reduce is not None and t >= last_reduce else "before_last_allreduce_us"
            d[key] = d.get(key, 0.0) + dur
    counts: dict = {}
    for _, _, name in wins:
        counts[name] = counts.get(name, 0) + 1
    return {"per_phase": per, "windows": counts, "step_windows": len(step_wins), "device_events": len(dev),
            "device_us_total": total, "device_busy_us": union_length(busy), "unmatched_us": unmatched_us,
            "outside_windows_us": outside_us, "outside_steps_us": outside_steps_us,
            "nccl_us": nccl_us, "allreduce_calls_seen": len(reduce_calls)}


def _selftest_attribute() -> dict:
    """attribute() on a made-up CUDA trace (kernels launched from two threads)."""
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn_step.1", "ts": -100, "dur": 90, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn.forward", "ts": -95, "dur": 80, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": -90, "dur": 2, "tid": 1,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": -80, "dur": 40, "args": {"correlation": 7}},
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn_step.2", "ts": -1, "dur": 352, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn.forward", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn.backward", "ts": 100, "dur": 200, "tid": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ddp_fnn.optimizer", "ts": 300, "dur": 50, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 10, "dur": 2, "tid": 1,
         "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 20, "dur": 40, "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 150, "dur": 2, "tid": 2,
         "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "gemm_bwd", "ts": 160, "dur": 90, "args": {"correlation": 2}},
        {"ph": "X", "cat": "cpu_op", "name": "c10d::allreduce_", "ts": 200, "dur": 5, "tid": 2, "args": {}},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 210, "dur": 2, "tid": 2,
         "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": 250, "dur": 10,
         "args": {"correlation": 3}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 320, "dur": 2, "tid": 1,
         "args": {"correlation": 4}},
        {"ph": "X", "cat": "kernel", "name": "sgd", "ts": 330, "dur": 5, "args": {"correlation": 4}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 400, "dur": 1, "args": {"correlation": 99}},
    ]
    r = attribute(ev, steps=(2, 2))
    p = r["per_phase"]
    ok = (r["step_windows"] == 1 and r["outside_steps_us"] == 40 and r["outside_windows_us"] == 0
          and r["device_us_total"] == 145 and p["forward"]["device_us"] == 40 and p["backward"]["device_us"] == 100
          and p["backward"].get("before_last_allreduce_us") == 90 and p["backward"].get("after_last_allreduce_us") == 10
          and p["backward"]["nccl_us"] == 10 and p["optimizer"]["device_us"] == 5 and r["unmatched_us"] == 1
          and r["device_busy_us"] == 145)
    return {"ok": ok, "result": r}


def _device_time_names(avg) -> float:
    """An averaged event's self device time in us, whatever this torch calls it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        try:
            v = getattr(avg, name)
        except Exception:
            continue
        if v is not None:
            return float(v)
    return 0.0


def _key_averages_total(prof) -> dict:
    import warnings
    total, n, names = 0.0, 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for avg in prof.key_averages():
            dt = str(getattr(avg, "device_type", ""))
            if not dt.endswith("CUDA") or getattr(avg, "is_user_annotation", False):
                continue
            if str(avg.key).startswith("ddp_fnn."):
                continue
            us = _device_time_names(avg)
            total += us
            n += 1
            names[avg.key] = names.get(avg.key, 0.0) + us
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return {"device_us_total": total, "rows": n, "top": [{"name": k, "us": v} for k, v in top]}


def worker_profile(cfg: dict, em: Emitter) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ddp_fnn import observe
    from ddp_fnn.train import loop as trainer

    em["selftest"] = _selftest_attribute()
    dev = cfg["device"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    prof = profile(activities=acts, record_shapes=False, with_stack=False)
    first, last = cfg["from"], cfg["to"]
    lead = 2                                   # profiler on from 2 steps before the compared ones
    if not (lead + 1 <= first <= last < cfg["steps"]):
        raise ValueError(f"profile steps {first}..{last} must lie in {lead + 1}..{cfg['steps'] - 1}")
    state = {"on": False, "step_rf": None}
    orig_begin, orig_end, orig_phase = observe.Observer.begin_step, observe.Observer.end_step, observe.Observer.phase

    def begin_step(self, step):
        if step == first - lead:
            _sync(dev)
            prof.start()
            state["on"] = True
        elif step == last + 1 and state["on"]:
            _sync(dev)
            prof.stop()
            state["on"] = False
        rf = record_function(f"ddp_fnn_step.{step}")
        rf.__enter__()
        state["step_rf"] = rf
        orig_begin(self, step)

    def end_step(self, samples, loss=None):
        orig_end(self, samples, loss)
        rf, state["step_rf"] = state["step_rf"], None
        if rf is not None:
            rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def phase(self, name):
        with record_function(f"ddp_fnn.{name}"), orig_phase(self, name):
            yield

    out = Path(cfg["output"])
    observe.Observer.begin_step, observe.Observer.end_step, observe.Observer.phase = begin_step, end_step, phase
    try:
        rc = trainer.main(_train_config(cfg, out))
    finally:
        observe.Observer.begin_step, observe.Observer.end_step, observe.Observer.phase = \
            orig_begin, orig_end, orig_phase
        if state["on"]:
            prof.stop()
    (out / "model.pt").unlink(missing_ok=True)
    em["trainer_exit"] = rc
    if rc != 0:
        raise RuntimeError(f"trainer.main returned {rc}")
    recs = [r for r in _read_steps(out / "steps-rank0.jsonl") if first <= r["step"] <= last]
    n = len(recs)
    ours = {p: sum(r[f"{p}_s"] for r in recs) for p in PHASES}
    ours["sync_wait"] = sum(sync_wait(r) for r in recs)
    ours["backward_all"] = ours["backward"] + ours["sync_wait"]
    ours["step"] = sum(r["step_s"] for r in recs)
    em["profiled_steps"] = {"from": first, "to": last, "records": n}
    em["ddp_fnn_per_step_s"] = {k: v / n for k, v in ours.items()} if n else {}

    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    att = attribute(events, cpu_standin=(dev != "cuda"), steps=(first, last))
    em["attribution"] = att
    if dev == "cuda" and not att["device_events"]:
        em["warning"] = "the trace holds no CUDA kernel events (CUPTI unavailable?): nothing to compare"
    em["device_kind"] = "CUDA kernels, memcpys and memsets (CUPTI)" if dev == "cuda" else \
        "top-level CPU ops (CPU smoke test stand-in for kernels)"
    if dev == "cuda":
        ka = _key_averages_total(prof)               # the whole profiled range: the lead steps too
        ka["profiled_steps"] = last - first + 1 + lead
        ka["device_s_per_step"] = ka["device_us_total"] / 1e6 / ka["profiled_steps"]
        em["key_averages"] = ka
    pp = att["per_phase"]

    def dev_s(phase, key="device_us"):
        return (pp.get(phase) or {}).get(key, 0.0) / 1e6

    compare = {}
    pairs = {
        "data": (ours["data"], dev_s("data")),
        "forward": (ours["forward"], dev_s("forward")),
        "backward_all": (ours["backward_all"], dev_s("backward")),
        "backward_compute": (ours["backward"], dev_s("backward", "before_last_allreduce_us")
                             if "before_last_allreduce_us" in (pp.get("backward") or {}) else dev_s("backward")),
        "optimizer": (ours["optimizer"], dev_s("optimizer")),
        "step": (ours["step"], att["device_busy_us"] / 1e6),
    }
    for name, (a, b) in pairs.items():
        r = _ratio(a, b)
        compare[name] = {"ddp_fnn_s_per_step": a / n if n else None, "profiler_s_per_step": b / n if n else None,
                         "ratio": r, "judged": name in ("forward", "backward_all", "backward_compute", "optimizer"),
                         "within_10pct": (abs(r - 1) <= TARGET_PROFILER) if r is not None else None}
    compare["step"]["note"] = "profiler side: union of device busy intervals (GPU utilisation over the steps)"
    compare["data"]["note"] = "host work (numpy gather) during which the GPU waits: not judged"
    em["compare"] = compare
    em["all_judged_within_10pct"] = all(c["within_10pct"] for c in compare.values() if c["judged"])
    em["profiler_window_kernel_time_per_step_s"] = att["device_us_total"] / 1e6 / n if n else None


# ---- c: the plain loop ----------------------------------------------------------------

def worker_plain(cfg: dict, em: Emitter) -> None:
    import torch
    import torch.nn.functional as F

    from ddp_fnn.train.model import build_fnn

    dev = torch.device(cfg["device"])
    cuda = dev.type == "cuda"
    layers = [int(w) for w in cfg["layers"].split(",")]
    B = cfg["batch"]

    def timed(fn, warmup, steps, repeats):
        for _ in range(warmup):
            fn()
        _sync(cfg["device"])
        out = []
        for _ in range(repeats):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(steps):
                    fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3 / steps)
            else:
                t = time.perf_counter()
                for _ in range(steps):
                    fn()
                out.append((time.perf_counter() - t) / steps)
        return out

    # the ceiling: one square bf16 matmul
    n = cfg["gemm_n"]
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ts = timed(lambda: torch.mm(a, b), 3, 10, 3)
    em["gemm"] = {"n": n, "s": _median(ts), "tflops": 2 * n ** 3 / _median(ts) / 1e12}
    del a, b
    em["variants"] = {}

    def variant(name, model, sync_check=False):
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(B, layers[0], generator=g).to(dev)
        y = torch.randn(B, layers[-1], generator=g).to(dev)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.mse_loss(model(x), y)
            if sync_check and not bool(torch.isfinite(loss.detach())):
                raise RuntimeError("non-finite loss")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = time.perf_counter()
        step()                                  # the first step (compiles, for torch.compile)
        _sync(cfg["device"])
        first = time.perf_counter() - t
        ts = timed(step, cfg["warmup"], cfg["steps"], cfg["repeats"])
        em["variants"][name] = {"first_step_s": first, "step_s_runs": ts, "step_s_median": _median(ts)}
        em.flush()
        del opt

    base = build_fnn(layers, seed=0).to(dev)
    variant("eager", base)
    variant("eager_sync", build_fnn(layers, seed=0).to(dev), sync_check=True)
    if cfg["compile"]:
        try:
            model = build_fnn(layers, seed=0).to(dev)
            variant("compiled", torch.compile(model))
        except Exception as e:
            em["compile_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    else:
        em["compile_error"] = "skipped (--no-compile)"
    if cuda:
        em["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30


# ---- d: the NaN check ------------------------------------------------------------------

class NanCheck:
    """Stands in for the builtin ``bool`` inside ddp_fnn.train.loop: anything but a tensor goes
    to the builtin; a tensor (the isfinite flag) is checked one step late (``deferred``) or
    not at all (``off``)."""

    def __init__(self, mode: str):
        import torch
        self.torch, self.mode, self.prev, self.calls = torch, mode, None, 0

    def __call__(self, x=False):
        if not isinstance(x, self.torch.Tensor):
            return builtins.bool(x)
        self.calls += 1
        if self.mode == "off":
            return True
        t = x.detach()
        if t.is_cuda:
            flag = t.to("cpu", non_blocking=True)       # pinned, written when the stream gets there
            ev = self.torch.cuda.Event()
            ev.record()
        else:
            flag, ev = t.clone(), None
        prev, self.prev = self.prev, (flag, ev)
        if prev is None:
            return True
        if prev[1] is not None:
            prev[1].synchronize()                       # the previous step's forward: long done
        return builtins.bool(prev[0])


def worker_nancheck(cfg: dict, em: Emitter) -> None:
    from ddp_fnn.train import loop as trainer

    variants = ("every", "deferred", "off")
    em["variants"] = list(variants)
    em["models"] = []
    base = Path(cfg["output"])
    for m in cfg["models"]:
        entry = {"layers": m["layers"], "global_batch_size": m["batch"], "steps": cfg["steps"],
                 "runs": {v: [] for v in variants}}
        em["models"].append(entry)
        for rnd in range(cfg["rounds"]):
            order = variants[rnd % 3:] + variants[:rnd % 3]
            for v in order:
                out = base / f"{m['layers'].replace(',', '-')}-r{rnd}-{v}"
                checker = NanCheck(v) if v != "every" else None
                if checker is not None:
                    trainer.bool = checker
                try:
                    rc = trainer.main(_train_config({**cfg, **m, "samples": max(8 * m["batch"], 64)}, out,
                                                    log_every=cfg["steps"]))
                finally:
                    if hasattr(trainer, "bool"):
                        del trainer.bool
                if rc != 0:
                    raise RuntimeError(f"trainer.main returned {rc} ({m['layers']}, {v})")
                recs = _read_steps(out / "steps-rank0.jsonl")
                use = recs[cfg["skip"]:]
                starts = [r["start_s"] for r in use]
                run = {"round": rnd, "step_s_median": _median([r["step_s"] for r in use]),
                       "host_interval_s_median": _median([b - a for a, b in zip(starts, starts[1:])]),
                       "forward_s_median": _median([r["forward_s"] for r in use]),
                       "backward_s_median": _median([r["backward_s"] for r in use]),
                       "checks_intercepted": checker.calls if checker is not None else None}
                entry["runs"][v].append(run)
                shutil.rmtree(out, ignore_errors=True)
                em.flush()
        summ = {}
        for v in variants:
            runs = entry["runs"][v]
            summ[v] = {"host_interval_s": _median([r["host_interval_s_median"] for r in runs]),
                       "step_s": _median([r["step_s_median"] for r in runs])}
        entry["medians"] = summ
        per_round = {}
        for other in ("deferred", "off"):
            per_round[other] = [_ratio(a["host_interval_s_median"], b["host_interval_s_median"])
                                for a, b in zip(entry["runs"]["every"], entry["runs"][other])]
        entry["ratios"] = {
            "every_over_deferred_host": _ratio(summ["every"]["host_interval_s"], summ["deferred"]["host_interval_s"]),
            "every_over_off_host": _ratio(summ["every"]["host_interval_s"], summ["off"]["host_interval_s"]),
            "every_over_deferred_step": _ratio(summ["every"]["step_s"], summ["deferred"]["step_s"]),
            "every_over_off_step": _ratio(summ["every"]["step_s"], summ["off"]["step_s"]),
            "every_over_deferred_host_per_round_median": _median(per_round["deferred"]),
            "every_over_off_host_per_round_median": _median(per_round["off"]),
        }
        em.flush()


WORKERS = {"env": worker_env, "profile": worker_profile, "plain": worker_plain, "nancheck": worker_nancheck}


def run_worker_main(name: str, cfg_path: str, out_path: str) -> int:
    em = Emitter(Path(out_path))
    cfg = _read_json(Path(cfg_path))
    try:
        WORKERS[name](cfg, em)
        return 0
    except BaseException as e:                      # recorded, then the exit status says so
        em["error"] = f"{type(e).__name__}: {str(e)[:4000]}"
        em["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        return 1


# =======================================================================================
# reporting
# =======================================================================================

def _f(x, unit: str = "", nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if unit == "ms":
        return f"{x * 1e3:.{nd}f} ms"
    if unit == "%":
        return f"{x * 100:.1f} %"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"
    return str(x)


def render_part(name: str, r: dict) -> str:
    L = []
    if r.get("skipped"):
        status = "SKIPPED"
    elif not r.get("ran"):
        status = "FAILED (did not run to the end)"
    else:
        status = {True: "ran; checks passed", False: "ran; checks NOT met", None: "ran"}[r.get("passed")]
    L.append(f"### part {name}: {status}")
    if r.get("skipped"):
        L.append(f"skipped: {r['skipped']}")
    run = r.get("run") or {}
    if run:
        L.append(f"rc {run.get('rc')}, timed out: {_f(run.get('timed_out'))}, {run.get('wall_s', 0):.1f} s")
    if r.get("error"):
        L.append(f"error: {r['error']}")
    if r.get("warning"):
        L.append(f"warning: {r['warning']}")
    if not r.get("ran") and run.get("stderr_tail"):
        L.append("stderr (tail):\n```\n" + run["stderr_tail"][-1500:] + "\n```")
    fn = {"env": _md_env, "a": _md_a, "b": _md_b, "c_train": _md_c_train, "c_plain": _md_c_plain, "d": _md_d}[name]
    try:
        L += fn(r)
    except Exception as e:                               # an incomplete result: say so, keep going
        L.append(f"(cannot render: {type(e).__name__}: {e})")
    return "\n".join(L) + "\n"


def _md_env(r):
    keys = ("device_name", "capability", "sm_count", "memory_gib", "torch", "cuda", "cudnn", "nccl", "triton",
            "python", "tf32_matmul", "cc", "python_h")
    L = ["| | |", "|---|---|"] + [f"| {k} | {_f(r.get(k))} |" for k in keys if k in r]
    if r.get("nvidia_smi"):
        L.append("\n```\n" + r["nvidia_smi"] + "\n```")
    return L


def _md_a(r):
    L = [f"layers {r.get('layers')}, global batch {r.get('global_batch_size')}, {r.get('steps')} steps, fp32, "
         f"{r.get('backend')}, world size 1", "", "| check | result |", "|---|---|"]
    L += [f"| {k} | {_f(v)} |" for k, v in (r.get("checks") or {}).items()]
    an = r.get("analysis")
    if an:
        L += ["", "| median over steps 2.. | |", "|---|---|"]
        for k in ("step_s", "data_s", "forward_s", "backward_s", "optimizer_s", "sync_wait_s", "comm_s", "exposed_s",
                  "tail_s"):
            L.append(f"| {k} | {_f(an.get(k + '_median'), 'ms')} |")
        ps = an["phase_sum_over_step_per_step"]
        L.append(f"| phases total / step total | {_f(an['phase_sum_s_total'], 'ms')} / {_f(an['step_s_total'], 'ms')}"
                 f" = {_f(an['phase_sum_over_step'], nd=4)} |")
        L.append(f"| per step ratio min / median / max | {_f(ps['min'], nd=4)} / {_f(ps['median'], nd=4)} / "
                 f"{_f(ps['max'], nd=4)} |")
    ph = r.get("phases_positive")
    if ph:
        L.append("| smallest per phase | " + ", ".join(f"{k} {_f(v, 'ms')}" for k, v in ph["min_s"].items()) + " |")
    s = r.get("summary")
    if s:
        L += ["", "| summary.json | |", "|---|---|"] + [f"| {k} | {_f(v)} |" for k, v in s.items()]
        pk = r.get("mfu_peak") or {}
        L.append(f"| mfu peak used | {pk.get('entry')} {pk.get('precision')}: {_f(pk.get('peak_flops'))} FLOP/s |")
    if r.get("metrics"):
        L += ["", "| /metrics after the last step | |", "|---|---|"]
        L += [f"| `{k}` | {_f(v)} |" for k, v in r["metrics"].items()]
        L.append(f"| step mean from the histogram | {_f(r.get('metrics_step_mean_s'), 'ms')} |")
    return L


def _md_b(r):
    L = []
    st = r.get("selftest")
    if st:
        L.append(f"attribution self-test on a made-up trace: {_f(st.get('ok'))}")
    p = r.get("profiled_steps")
    if p:
        L.append(f"profiled steps {p['from']}..{p['to']} ({p['records']} step records); device side: "
                 f"{r.get('device_kind')}")
    c = r.get("compare")
    if c:
        L += ["", "| phase (per step) | ddp-fnn (its clock) | profiler | ratio | within 10 % |", "|---|---|---|---|---|"]
        for k, v in c.items():
            L.append(f"| {k} | {_f(v['ddp_fnn_s_per_step'], 'ms')} | {_f(v['profiler_s_per_step'], 'ms')} | "
                     f"{_f(v['ratio'], nd=4)} | {_f(v['within_10pct']) if v['judged'] else '(not judged)'} |")
        L.append(f"\nall judged within 10 %: {_f(r.get('all_judged_within_10pct'))}")
    a = r.get("attribution")
    if a:
        L.append(f"over the compared steps: device time {_f(a['device_us_total'] / 1e3)} ms, busy "
                 f"{_f(a['device_busy_us'] / 1e3)} ms, NCCL {_f(a['nccl_us'] / 1e3)} ms, launched outside the "
                 f"phases {_f(a['outside_windows_us'] / 1e3)} ms; lead steps {_f(a['outside_steps_us'] / 1e3)} ms; "
                 f"unmatched {_f(a['unmatched_us'] / 1e3)} ms; phase windows {a['windows']}")
    k = r.get("key_averages")
    if k:
        L.append(f"key_averages() device total over {k['profiled_steps']} profiled steps (lead included): "
                 f"{_f(k['device_s_per_step'], 'ms')} a step; the trace's, compared steps only: "
                 f"{_f(r.get('profiler_window_kernel_time_per_step_s'), 'ms')} a step")
    return L


def _md_c_train(r):
    L = [f"layers {r.get('layers')}, global batch {r.get('global_batch_size')}, {r.get('steps')} steps, bf16 autocast,"
         f" {_f(r.get('flops_per_sample'))} FLOP per sample"]
    pk = r.get("peak") or {}
    if pk.get("peak_flops"):
        L.append(f"peak used: ddp_fnn/observe/mfu.py PEAK_FLOPS[{pk.get('entry')!r}][{pk.get('precision')!r}] = "
                 f"{pk['peak_flops'] / 1e12:.1f} TFLOP/s for device {pk.get('device')!r}")
    else:
        L.append(f"no peak in ddp_fnn/observe/mfu.py for device {pk.get('device')!r} ({pk.get('precision')}): no MFU")
    if pk.get("note"):
        L.append(f"note: {pk['note']}")
    L += ["", "| | |", "|---|---|",
          f"| MFU (summary.json, every step) | {_f(r.get('mfu_summary'), '%')} |",
          f"| MFU (median step after warm-up) | {_f(r.get('mfu_steady'), '%')} |",
          f"| TFLOP/s (median step) | {_f(r.get('tflops_steady'), nd=1)} |",
          f"| target MFU >= 60 % met | {_f(r.get('mfu_target_met'))} |"]
    an = r.get("analysis")
    if an:
        for k in ("step_s", "data_s", "forward_s", "backward_s", "sync_wait_s", "optimizer_s"):
            L.append(f"| {k} median | {_f(an.get(k + '_median'), 'ms')} |")
        L.append("| shares | " + ", ".join(f"{k} {_f(v, '%')}" for k, v in an["shares_of_median_step"].items()) + " |")
        L.append(f"| phases / step | {_f(an['phase_sum_over_step'], nd=4)} |")
    return L


def _md_c_plain(r):
    L = []
    g = r.get("gemm")
    if g:
        L.append(f"bf16 matmul {g['n']}^3: {_f(g['tflops'], nd=1)} TFLOP/s ({_f(g.get('of_peak'), '%')} of the peak)")
    v = r.get("variants") or {}
    if v:
        L += ["", "| plain loop | first step | step (median) | TFLOP/s | MFU | trainer step / this |",
              "|---|---|---|---|---|---|"]
        comp = r.get("comparison") or {}
        for k, x in v.items():
            L.append(f"| {k} | {_f(x.get('first_step_s'), 'ms', 1)} | {_f(x.get('step_s_median'), 'ms')} | "
                     f"{_f(x.get('tflops'), nd=1)} | {_f(x.get('mfu'), '%')} | "
                     f"{_f((comp.get(k) or {}).get('trainer_over_this'), nd=3)} |")
    if r.get("compile_error"):
        L.append(f"\ntorch.compile: {r['compile_error'][:500]}")
    if r.get("compiled_speedup_over_eager"):
        L.append(f"\ncompiled / eager speed-up: {_f(r['compiled_speedup_over_eager'], nd=3)}x")
    L.append(f"fastest: {r.get('fastest')}")
    if r.get("limits"):
        L += ["", "What limits the trainer's MFU:"] + [f"- {x}" for x in r["limits"]]
    return L


def _md_d(r):
    L = []
    for m in r.get("models") or []:
        L += ["", f"layers {m['layers']}, global batch {m['global_batch_size']}, {m['steps']} steps a run",
              "", "| variant | host step interval (median of run medians) | step_s (CUDA events) | runs |",
              "|---|---|---|---|"]
        for v, runs in m["runs"].items():
            med = (m.get("medians") or {}).get(v) or {}
            L.append(f"| {v} | {_f(med.get('host_interval_s'), 'ms')} | {_f(med.get('step_s'), 'ms')} | "
                     + ", ".join(_f(x['host_interval_s_median'], 'ms') for x in runs) + " |")
        rt = m.get("ratios")
        if rt:
            L.append("\n" + ", ".join(f"{k} {_f(v, nd=3)}" for k, v in rt.items()))
    return L


def render_markdown(res: dict) -> str:
    L = ["# ddp-fnn on one GPU (benchmarks/gpu.py)", "",
         f"device {res.get('device')} ({res.get('device_name')}), backend {res.get('backend')}, "
         f"quick {res.get('quick')}, elapsed {res.get('elapsed_s', 0):.0f} s", ""]
    for name in ORDER:
        if name in res["parts"]:
            L.append(render_part(name, res["parts"][name]))
    return "\n".join(L)


# =======================================================================================

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="output directory (gpu.json, gpu.md, logs/, artifacts/)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (NCCL), or cpu (Gloo: a smoke test of the script)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    ap.add_argument("--parts", default="env,a,b,c,d", help="comma list of env,a,b,c,d (c = c_train + c_plain)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="the whole run's time limit in seconds")
    ap.add_argument("--reserve-s", type=float, default=10.0, help="kept back from each part's share of the budget")
    ap.add_argument("--min-part-s", type=float, default=30.0, help="skip a part when less than this is left")
    ap.add_argument("--timeout-scale", type=float, default=None, help="multiply every part's own timeout")
    ap.add_argument("--no-compile", action="store_true", help="c: skip the torch.compile variant")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a size (see SIZES)")
    ap.add_argument("--work-dir", help="scratch directory (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker_main(args.worker, args.worker_config, args.worker_out)
    if not args.out:
        ap.error("--out DIR is required")
    parts = []
    for p in args.parts.split(","):
        p = p.strip()
        if p == "c":
            parts += ["c_train", "c_plain"]
        elif p in TIMEOUTS:
            parts.append(p)
        elif p:
            ap.error(f"--parts: unknown part {p!r}")
    if any(p != "env" for p in parts) and "env" not in parts:
        parts.insert(0, "env")                       # the device name is needed for MFU
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    d = Driver(args)
    print(f"benchmarks/gpu.py: device {args.device}, parts {','.join(parts)}, budget {args.budget_s:.0f} s, "
          f"out {d.out}", flush=True)
    return d.run(parts)


if __name__ == "__main__":
    sys.exit(main())
