"""ddp-fnn on one CUDA GPU, through its public CLI only: is the clock right, what does the
trainer reach, what do its host syncs cost. Each trainer run is a subprocess (torchrun or
`python -m ddp_fnn train`) with a timeout; figures come from what it writes (summary.json,
steps-rank0.jsonl, --profile's trace, /metrics). A part that fails is recorded; the rest run.

    launch/gpu.sh OUT                  # on the GPU (PYTHONPATH=. python3 benchmarks/gpu.py --out OUT)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu.py --out /tmp/g --device cpu --quick  # smoke test

OUT/gpu.json (strict JSON) and OUT/gpu.md (the table on stdout) are rewritten after every
part; OUT/logs/ and OUT/artifacts/ hold each run's output and files. Exit 0 when every part
ran, whatever its checks say; 1 otherwise. The parts:

env      device, torch, CUDA, NCCL, nvidia-smi.
a        world size 1, NCCL, torchrun, fp32: exit 0, a step line a step, phases > 0, data +
         forward + backward + sync wait + optimizer = step within 5 %, /metrics after the last
         step, summary.json's clock offsets (world size 1: no Gloo control group; 0), and each
         step's loss (copied to the host without waiting, read at log steps once an event
         behind the copy completed) averaging to the loss logged at each log step (1e-6).
profile  --grad-accum 4 --profile A:B, a log step every 5: each kernel is credited to the
         ddp_fnn.<phase> range its launch call fell in (any thread); the trainer's CUDA-event
         phases / kernel time over the same steps within 10 % for forward, backward (the call;
         compute before the last all-reduce) and optimizer (CPU: top-level ops stand in;
         >= 0.9). Host waits (profile_trace.host_syncs: cudaEventSynchronize and every other
         synchronise, copies to pageable memory, device-tensor reads): none in a step between
         log steps (records and the NaN check wait for the log step), none in forward or
         backward, and (CUDA) some at the log steps, where the host does wait.
bf16     wide FNN, --precision bf16, torchrun: MFU (summary.json; median step) >= 60 %.
runahead DDP_FNN_RUN_AHEAD=0:0.02 beside a plain run (the one-clock rule): every step starts
         >= 20 ms after its queue time; CPU: those 20 ms lie between steps, in none; CUDA:
         median step_s up by < 10 ms (step and phase figures plain -> run-ahead are shown,
         not checked on CPU: a timing comparison on a busy host). DDP_FNN_SLOW_STREAM=0:0.05
         (a spin kernel of 50 ms in every forward; CPU: an emulated stream): the host >= 4
         steps ahead of its device within a log interval of 10 (the step file's queued_s
         against earlier steps' ends; a host that waited for anything a step late would
         stay within 2), and caught up right after each log step, where it waits.
nan      --on-nan skip on data with a NaN row completes, skipping; --target-loss stops.
detail   --bucket-detail-every 1 and 10 run; on CUDA every step stays detailed.
plain    not the trainer: an N^3 bf16 matmul (the ceiling), the bf16 model in a plain loop
         (eager, torch.compile) beside the trainer's step.
"""

from __future__ import annotations

import argparse
import gzip
import os
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

SCRIPT = str(Path(__file__).resolve())
REPO = Path(SCRIPT).parent.parent
sys.path.insert(0, str(REPO))
from ddp_fnn.core import fileio  # noqa: E402
from ddp_fnn.observe import mfu as mfu_table  # noqa: E402  (a table, no torch)
from ddp_fnn.observe.profile_trace import attribute, host_syncs, trace_steps  # noqa: E402
from ddp_fnn.observe.stepfile import steps_ahead  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")
TARGET_SUM, TARGET_PROFILER, TARGET_MFU, AHEAD_S, STREAM_S, ACCUM = 0.05, 0.10, 0.60, 0.02, 0.05, 4
PROFILE_LOG_EVERY = 5          # a log step inside the profiled window: where the host may wait
SIZES = {
    "full": {"mid_layers": "1024,4096,4096,4096,1024", "mid_batch": 4096, "mid_samples": 65536, "mid_lr": 1e-6,
             "a_steps": 100, "prof_steps": 30, "prof_window": "19:28", "lead": 2, "ra_steps": 60, "skip": 5,
             "wide_layers": "256,8192,8192,8192,8192,8192,256", "wide_batch": 8192, "wide_samples": 40960,
             "wide_lr": 1e-6, "bf16_steps": 40, "small_layers": "64,512,512,4", "small_batch": 512,
             "small_steps": 40, "plain_steps": 10, "gemm_n": 8192},
    "quick": {"mid_layers": "32,256,256,8", "mid_batch": 256, "mid_samples": 4096, "mid_lr": 1e-3,
              "a_steps": 12, "prof_steps": 10, "prof_window": "3:8", "lead": 1, "ra_steps": 12, "skip": 2,
              "wide_layers": "16,128,128,128,4", "wide_batch": 128, "wide_samples": 1024, "wide_lr": 1e-3,
              "bf16_steps": 8, "small_layers": "16,64,4", "small_batch": 64, "small_steps": 20,
              "plain_steps": 3, "gemm_n": 256},
}
TIMEOUTS = {"env": 90, "a": 150, "profile": 150, "bf16": 120, "runahead": 150, "nan": 120, "detail": 120,
            "plain": 200}      # in this order; plain last: torch.compile is the likeliest to run long
RUNNING: list = []             # the subprocess now running (its group is killed if this script is stopped)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None


def read_json(path: Path, default=None):
    return fileio.loads(path.read_text()) if path.exists() else default


def read_steps(path: Path) -> list[dict]:
    return [fileio.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def run_cmd(cmd: list[str], timeout: float, log: Path, env: dict | None = None, poll=None) -> dict:
    """``cmd`` from the repo root (importable, unbuffered, no torchrun variables inherited),
    output to ``log``.out/.err, its process group killed after ``timeout``; ``poll()`` twice a
    second while it runs."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_") and k not in (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), **(env or {})}
    t0, rc = time.monotonic(), None
    with open(f"{log}.out", "w") as fo, open(f"{log}.err", "w") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, cwd=REPO, env=full, start_new_session=True)
        RUNNING.append(p)
        while rc is None and time.monotonic() - t0 < timeout:
            try:
                rc = p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                try:
                    poll and poll()
                except Exception:
                    pass
        if rc is None:
            kill_group(p)
        RUNNING.remove(p)
    err = Path(f"{log}.err").read_text(errors="replace")
    return {"cmd": " ".join(cmd), "env": env, "rc": p.returncode, "timed_out": rc is None, "ok": rc == 0,
            "wall_s": time.monotonic() - t0, "stderr_tail": err[-(400 if rc == 0 else 2500):]}


def kill_group(p) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def peak_entry(device_name: str | None, precision: str) -> dict:
    """ddp_fnn/observe/mfu.py's peak for the device name, and the table entry that gave it."""
    entry = next((f for f in mfu_table.PEAK_FLOPS if device_name and f in device_name), None)
    return {"device": device_name, "precision": precision, "entry": entry,
            "peak_flops": mfu_table.PEAK_FLOPS[entry].get(precision) if entry else None}


def step_figures(recs: list[dict], skip: int) -> dict:
    """Median and IQR of the step, its phases and the host's step interval after ``skip``
    warm-up steps; phases (sync wait = sync_end_s - sync_start_s included) over the step."""
    use = recs[skip:] if len(recs) > skip else recs
    for r in use:
        r["sync_wait_s"] = max(0.0, r["sync_end_s"] - r["sync_start_s"])
        r["phase_sum_s"] = sum(r[f"{p}_s"] for p in PHASES) + r["sync_wait_s"]
    series = {k: [r[k] for r in use] for k in ("step_s", *(f"{p}_s" for p in PHASES), "sync_wait_s", "comm_s")}
    series["host_interval_s"] = [b["start_s"] - a["start_s"] for a, b in zip(use, use[1:])]
    out = {"steps_used": len(use),
           "phase_sum_over_step": ratio(sum(r["phase_sum_s"] for r in use), sum(r["step_s"] for r in use)),
           "phase_sum_over_step_median": median([r["phase_sum_s"] / r["step_s"] for r in use if r["step_s"] > 0])}
    for k, xs in series.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [0.0] * 3
        out[k] = {"median": median(xs), "iqr": q[2] - q[0]}
    return out


def logged_loss_errors(recs: list[dict], progress_log: Path) -> list[float | None]:
    """Per log step of a world-size-1 run: the relative difference between the loss it
    logged (--progress json: one host read of the interval's sum) and the mean of the step
    file's per-step losses over the same steps, weighted by their samples. The per-step
    losses are copied to the host without waiting; one read before its copy landed would
    show here. None where a step of the interval has no loss."""
    lines = [fileio.loads(ln) for ln in progress_log.read_text().splitlines()
             if ln.startswith("{") and '"train_loss"' in ln] if progress_log.exists() else []
    by_step, out, prev = {x["step"]: x for x in recs}, [], 0
    for ln in lines:
        steps = [by_step.get(k) for k in range(prev + 1, ln["step"] + 1)]
        prev = ln["step"]
        if not steps or any(x is None or x.get("loss") is None for x in steps):
            out.append(None)                    # a step without its loss: fails the check
            continue
        mean = sum(x["loss"] * x["samples"] for x in steps) / sum(x["samples"] for x in steps)
        out.append(abs(mean - ln["train_loss"]) / max(abs(ln["train_loss"]), 1e-30))
    return out


# ---- the parts ---------------------------------------------------------------------------------

class Driver:
    def __init__(self, args):
        self.args, self.s = args, dict(SIZES["quick" if args.quick else "full"])
        self.cuda = args.device == "cuda"
        self.out = Path(args.out)
        self.logs, self.art = self.out / "logs", self.out / "artifacts"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.art.mkdir(exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="ddp-fnn-gpu-"))
        self.t0 = time.monotonic()
        self.res = {"script": "benchmarks/gpu.py", "argv": sys.argv[1:], "device": args.device,
                    "backend": "nccl" if self.cuda else "gloo", "quick": args.quick, "sizes": self.s,
                    "device_name": None, "parts": {}}

    def train(self, name: str, args: list[str], timeout: float, torchrun=False, env=None, poll=None):
        """One trainer run into work/<name>: (its run record, its --output directory)."""
        out = self.work / name
        head = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
                                   if torchrun else [])
        cmd = head + ["-m", "ddp_fnn", "train", "--device", self.args.device, "--backend", self.res["backend"],
                      "--no-probe", "--progress", "json", "--output", str(out), "--resume", "never",
                      "--metrics-port", "0", *args]
        run = run_cmd(cmd, timeout, self.logs / name, env=env, poll=poll)
        (out / "model.pt").unlink(missing_ok=True)
        return run, out

    def model(self, which: str, steps: int, log_every: int = 10) -> list[str]:
        s = self.s
        return ["--layers", s[f"{which}_layers"], "--global-batch-size", str(s[f"{which}_batch"]),
                "--samples", str(s.get(f"{which}_samples", 16 * s[f"{which}_batch"])), "--max-steps", str(steps),
                "--lr", str(s.get(f"{which}_lr", 1e-3)), "--log-every", str(log_every)]

    def keep(self, src: Path, name: str, gz: bool = False) -> str | None:
        if src.exists():
            with open(src, "rb") as fi, (gzip.open if gz else open)(self.art / (name + ".gz" * gz), "wb") as fo:
                shutil.copyfileobj(fi, fo)
            return name + ".gz" * gz
        return None

    def run(self, parts: list[str]) -> int:
        ok = True
        try:
            for name in (p for p in TIMEOUTS if p in parts):
                left = self.args.budget_s - (time.monotonic() - self.t0)
                timeout, t = min(TIMEOUTS[name], left - 10), time.monotonic()
                if timeout < self.args.min_part_s:
                    r = {"ran": False, "error": f"skipped: {left:.0f} s of the budget left"}
                else:
                    print(f"--- {name} (timeout {timeout:.0f} s, {left:.0f} s of budget left)", flush=True)
                    try:
                        r = getattr(self, f"part_{name}")(timeout)
                    except Exception as e:      # a bug in this script's analysis: recorded, the rest go on
                        r = {"ran": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                r |= {"wall_s": time.monotonic() - t, "checks": r.get("checks", {}), "show": r.get("show", {})}
                r["passed"] = all(r["checks"].values()) if r.get("ran") and r["checks"] else None
                self.res["parts"][name] = r
                ok = ok and bool(r.get("ran"))
                self.res["elapsed_s"] = time.monotonic() - self.t0
                fileio.write_json(self.out / "gpu.json", self.res)
                (self.out / "gpu.md").write_text(table(self.res["parts"]) + "\n")
                print(table({name: r}), flush=True)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
        print(f"\n{table(self.res['parts'])}\nwrote {self.out / 'gpu.json'} ({time.monotonic() - self.t0:.0f} s)")
        return 0 if ok else 1

    def part_env(self, timeout):
        path = self.work / "env.json"
        run = run_cmd([sys.executable, SCRIPT, "--worker", "env", "--device", self.args.device, "--out", str(path)],
                      timeout, self.logs / "env")
        f = read_json(path, {})
        self.res["device_name"] = f.get("device_name")
        if shutil.which("nvidia-smi"):
            f["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                              "clocks.max.sm,power.limit,temperature.gpu", "--format=csv"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
        return {"run": run, "ran": run["ok"], "figures": f,
                "show": {k: f.get(k) for k in ("device_name", "torch", "cuda", "nccl")}}

    def part_a(self, timeout):
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            port = so.getsockname()[1]
        out, scraped = self.work / "a", {}

        def poll():
            if "text" not in scraped and (out / "summary.json").exists():
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    scraped["text"] = resp.read().decode()

        run, out = self.train("a", self.model("mid", self.s["a_steps"]) + [
            "--metrics-port", str(port), "--metrics-linger", "4"], timeout, torchrun=True, poll=poll)
        recs, summ = read_steps(out / "steps-rank0.jsonl"), read_json(out / "summary.json", {})
        metrics = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in scraped.get("text", "").splitlines()
                   if ln.startswith(("ddp_fnn_step_duration_seconds_sum", "ddp_fnn_step_duration_seconds_count",
                                     "ddp_fnn_steps_total", "ddp_fnn_mfu_ratio"))}
        f = {"steps": step_figures(recs, 1), "metrics": metrics, "summary": {k: summ.get(k) for k in (
            "backend", "world_size", "parameters", "samples_per_second", "step_time_p50_s", "comm_time_per_step_s",
            "exposed_comm_time_per_step_s", "sync_tail_per_step_s", "mfu", "clock_offsets")}}
        f["min_s"] = {p: min((x[f"{p}_s"] for x in recs), default=None) for p in PHASES}
        f["min_s"]["comm"] = min((x["comm_s"] for x in recs if x["calls"]), default=None)
        mean = [v for k, v in sorted(metrics.items()) if k.startswith("ddp_fnn_step_duration_seconds_")]
        offs = summ.get("clock_offsets") or []
        f["loss_vs_logged"] = logged_loss_errors(recs, self.logs / "a.out")
        checks = {"exit_0": run["ok"], "summary_json": bool(summ), "metrics_scraped": bool(metrics),
                  "one_line_a_step": [x["step"] for x in recs] == list(range(1, self.s["a_steps"] + 1)),
                  "phases_positive": all(v is not None and v > 0 for v in f["min_s"].values()),
                  "phase_sum_within_5pct": all(v is not None and abs(v - 1) <= TARGET_SUM for v in (
                      f["steps"]["phase_sum_over_step"], f["steps"]["phase_sum_over_step_median"])),
                  "clock_offsets_ok": len(offs) == 1 and all(o.get(k) is not None and abs(o[k]) <= (
                      o.get("bound_start_s") or 0) + 1e-6 for o in offs for k in ("offset_start_s", "offset_end_s")),
                  "step_losses_average_to_the_logged_loss": bool(f["loss_vs_logged"]) and all(
                      e is not None and e <= 1e-6 for e in f["loss_vs_logged"])}
        show = {"step_s median": f["steps"]["step_s"]["median"], "phases / step": f["steps"]["phase_sum_over_step"],
                "/metrics step mean s": ratio(*reversed(mean)) if len(mean) == 2 else None,
                "MFU (summary.json)": summ.get("mfu"), "clock offsets": offs,
                "step losses vs logged (rel. errors)": f["loss_vs_logged"]}
        return {"run": run, "ran": run["ok"], "checks": checks, "figures": f, "show": show,
                "artifacts": [self.keep(out / "summary.json", "a_summary.json"),
                              self.keep(out / "steps-rank0.jsonl", "a_steps-rank0.jsonl")]}

    def part_profile(self, timeout):
        s, cpu = self.s, not self.cuda
        a, b = (int(x) for x in s["prof_window"].split(":"))
        run, out = self.train("profile", self.model("mid", s["prof_steps"], PROFILE_LOG_EVERY) + [
            "--grad-accum", str(ACCUM), "--profile", s["prof_window"], "--timeline", s["prof_window"]], timeout)
        r = {"run": run, "ran": run["ok"], "checks": {"trace_written": (out / "profile-rank0.json").exists()},
             "artifacts": [self.keep(out / "profile-rank0.json", "profile-rank0.json", gz=True),
                           self.keep(out / "timeline.json", "timeline.json", gz=True)]}
        if not r["checks"]["trace_written"]:
            return r
        events = read_json(out / "profile-rank0.json")["traceEvents"]
        nseg = len(trace_steps(events)[1])
        use = set(range(s["lead"], nseg))       # the profiler's first steps warm it up: not compared
        recs = [x for x in read_steps(out / "steps-rank0.jsonl") if a + s["lead"] <= x["step"] <= b]
        att, n = attribute(events, use, cpu), len(recs)
        ours = {p: sum(x[f"{p}_s"] for x in recs) for p in PHASES}
        wait = sum(max(0.0, x["sync_end_s"] - x["sync_start_s"]) for x in recs)
        pp = {k: att["per_phase"].get(k, {}) for k in (*PHASES, "sync")}
        pairs = {"data": (ours["data"], pp["data"].get("s")), "forward": (ours["forward"], pp["forward"].get("s")),
                 "backward_all": (ours["backward"] + wait, pp["backward"].get("s", 0) + pp["sync"].get("s", 0)),
                 "backward_compute": (ours["backward"], pp["backward"].get("before_last_allreduce_s")),
                 "optimizer": (ours["optimizer"], pp["optimizer"].get("s")),
                 "step (device busy)": (sum(x["step_s"] for x in recs), att["device_busy_s"])}
        comp = {k: {"ddp_fnn_s_per_step": ratio(x, n), "profiler_s_per_step": ratio(y, n), "ratio": ratio(x, y)}
                for k, (x, y) in pairs.items()}
        for k in ("forward", "backward_all", "backward_compute", "optimizer"):
            q = comp[k]["ratio"]
            r["checks"][f"{k}_{'at_least_0.9' if cpu else 'within_10pct'}"] = q is not None and (
                q >= 1 - TARGET_PROFILER if cpu else abs(q - 1) <= TARGET_PROFILER)
        # Trace step i is step a + i. A log step's own trace step holds its waits (records,
        # the loss, the NaN flags, the next step's re-anchor); the last one runs to the
        # trace's end, where the profiler stops: left out of both counts.
        per = host_syncs(events, use)
        step_of = {i: a + i for i in sorted(use)}
        logs = {i for i, st in step_of.items() if st % PROFILE_LOG_EVERY == 0 or st == s["prof_steps"]}
        judged = [i for i in sorted(use) if i != nseg - 1]
        between = [per[j]["blocking"] for j, i in enumerate(sorted(use)) if i in judged and i not in logs]
        at_logs = [per[j]["blocking"] for j, i in enumerate(sorted(use)) if i in judged and i in logs]
        r["checks"] |= {"trace_steps_match": nseg == b - a + 1 and n == len(use),
                        "no_host_sync_between_log_steps": bool(between) and max(between) == 0,
                        "no_host_sync_in_forward_backward": bool(per) and not any(
                            w in ("forward", "backward") for x in per for w in x["where"])}
        if not cpu:     # the counter sees the waits that are there (on CPU there is no device)
            r["checks"]["host_syncs_seen_at_log_steps"] = bool(at_logs) and min(at_logs) >= 1
        r["figures"] = {"compared_steps": [x["step"] for x in recs], "grad_accum": ACCUM, "compare": comp,
                        "attribution": att, "host_syncs_per_step": per, "log_every": PROFILE_LOG_EVERY,
                        "trace_step_numbers": [step_of[i] for i in sorted(use)],
                        "device_side": "top-level CPU ops (stand-in)" if cpu else "CUDA kernels, memcpys, memsets"}
        r["show"] = {f"{k} ours/profiler": v["ratio"] for k, v in comp.items()} | {
            "host waits / step between log steps (max)": max(between, default=None),
            "host waits at log steps": at_logs, "aten::item / step": median([x["aten::item"] for x in per]),
            "_local_scalar_dense / step": median([x["aten::_local_scalar_dense"] for x in per])}
        return r

    def part_bf16(self, timeout):
        s = self.s
        run, out = self.train("bf16", self.model("wide", s["bf16_steps"]) + ["--precision", "bf16"], timeout,
                              torchrun=True)
        peak, summ = peak_entry(self.res["device_name"], "bf16"), read_json(out / "summary.json", {})
        f = step_figures(read_steps(out / "steps-rank0.jsonl"), s["skip"])
        flops = mfu_table.train_flops_per_sample([int(w) for w in s["wide_layers"].split(",")]) * s["wide_batch"]
        med = self.res["trainer_bf16_step_s"] = f["step_s"]["median"]
        mfu = ratio(ratio(flops, med), peak["peak_flops"])
        shares = {k: ratio(f[k]["median"], med) for k in (*(f"{p}_s" for p in PHASES), "sync_wait_s")}
        return {"run": run, "ran": run["ok"], "figures": {"steps": f, "peak": peak, "flops_per_step": flops},
                "checks": {"mfu_at_least_60pct": (mfu or 0) >= TARGET_MFU} if peak["peak_flops"] else {},
                "show": {"MFU (median step)": mfu, "MFU (summary.json)": summ.get("mfu"), "peak entry": peak["entry"],
                         "TFLOP/s (median step)": ratio(flops / 1e12, med), "step shares": shares}}

    def part_runahead(self, timeout):
        log_every = 10
        args = self.model("mid", self.s["ra_steps"], log_every)
        base, out0 = self.train("ra_base", args, timeout / 3)
        ahead, out1 = self.train("ra_ahead", args, timeout / 3, env={"DDP_FNN_RUN_AHEAD": f"0:{AHEAD_S}"})
        slow, out2 = self.train("ra_stream", args, timeout / 3, env={"DDP_FNN_SLOW_STREAM": f"0:{STREAM_S}"})
        r = {"runs": [base, ahead, slow], "ran": base["ok"] and ahead["ok"] and slow["ok"], "checks": {}, "show": {}}
        if not r["ran"]:
            return r
        (l0, l1, l2), skip = (read_steps(o / "steps-rank0.jsonl") for o in (out0, out1, out2)), self.s["skip"]
        f0, f1 = step_figures(l0, skip), step_figures(l1, skip)
        # The one-clock rule: a step starts at its first mark, after the injected wait, never
        # at the queue time before it.
        lead = [x["start_s"] - x["queued_s"] for x in l1]
        gaps = [q["start_s"] - (p["start_s"] + p["step_s"]) for p, q in zip(l1, l1[1:])]
        r["checks"]["every_step_starts_after_the_injected_wait"] = bool(lead) and min(lead) >= 0.9 * AHEAD_S
        if self.cuda:   # the device may still be busy with the last step: the gap can be shorter
            r["checks"]["step_s_not_up_by_the_injected_wait"] = (
                f1["step_s"]["median"] - f0["step_s"]["median"] < 0.5 * AHEAD_S)
        else:           # one host, one thread: the wait lies between steps, whatever the load
            r["checks"]["the_injected_wait_lies_between_steps"] = bool(gaps) and min(gaps) >= 0.9 * AHEAD_S
        for k in ("step_s", *(f"{p}_s" for p in PHASES)):
            r["show"][f"{k} plain -> run-ahead"] = f"{f0[k]['median']:.4g} -> {f1[k]['median']:.4g}"
        r["show"]["host interval increase s"] = f1["host_interval_s"]["median"] - f0["host_interval_s"]["median"]
        # A slow device stream: the host runs ahead of it between log steps and waits at them.
        ahead_steps = steps_ahead(l2)
        after_log = [n for x, n in zip(l2[1:], ahead_steps[1:]) if (x["step"] - 1) % log_every == 0]
        r["checks"] |= {"host_at_least_4_steps_ahead_of_a_slow_stream": max(ahead_steps, default=0) >= 4,
                        "host_caught_up_after_each_log_step": bool(after_log) and max(after_log) == 0}
        r["show"] |= {"steps ahead of a slow stream (max, median)": [max(ahead_steps, default=None),
                                                                      median(ahead_steps)],
                      "steps ahead right after log steps": after_log}
        r["figures"] = {"plain": f0, "run_ahead": f1, "run_ahead_s": AHEAD_S, "start_after_queue_s": lead,
                        "gap_between_steps_s": gaps, "slow_stream_s": STREAM_S, "steps_ahead": ahead_steps}
        return r

    def part_nan(self, timeout):
        import numpy as np
        s, rng = self.s, np.random.default_rng(0)
        widths, n = [int(w) for w in s["small_layers"].split(",")], 8 * s["small_batch"]
        x = rng.standard_normal((n, widths[0])).astype(np.float32)
        x[n // 3, 0] = np.nan                       # one bad row: one skipped step an epoch
        np.savez(self.work / "nan.npz", x=x, y=rng.standard_normal((n, widths[-1])).astype(np.float32))
        skip, out0 = self.train("nan_skip", self.model("small", s["small_steps"]) + [
            "--data", str(self.work / "nan.npz"), "--eval-fraction", "0", "--on-nan", "skip"], timeout / 2)
        tgt, out1 = self.train("target_loss", self.model("small", s["small_steps"], 5) + ["--target-loss", "1e9"],
                               timeout / 2)
        f = {k: {x: read_json(o / "summary.json", {}).get(x) for x in ("steps", "stop_reason", "skipped_steps",
                                                                         "final_train_loss")}
             for k, o in (("on_nan_skip", out0), ("target_loss", out1))}
        fs, ft = f["on_nan_skip"], f["target_loss"]
        return {"runs": [skip, tgt], "ran": skip["ok"] and tgt["ok"], "figures": f, "show": f,
                "checks": {"skip_completes": fs["steps"] == s["small_steps"],
                           "skip_skipped_the_nan_steps": (fs["skipped_steps"] or 0) >= 1,
                           "target_loss_stops_at_first_log_step": ft["stop_reason"] == "target-loss"
                           and ft["steps"] == 5}}

    def part_detail(self, timeout):
        r = {"runs": [], "checks": {}, "show": {}, "figures": {}}
        for k in (1, 10):
            run, out = self.train(f"detail{k}", self.model("small", self.s["small_steps"]) + [
                "--bucket-detail-every", str(k)], timeout / 2)
            recs = read_steps(out / "steps-rank0.jsonl")
            detailed = sum(1 for x in recs if x["detailed"])
            expect = len(recs) if self.cuda or k == 1 else -(-len(recs) // k)
            f = r["figures"][f"every_{k}"] = step_figures(recs, self.s["skip"]) | {"detailed_steps": detailed}
            r["runs"].append(run)
            r["checks"] |= {f"every_{k}_runs": run["ok"] and len(recs) == self.s["small_steps"],
                            f"every_{k}_detailed_{expect}_of_{len(recs)}": detailed == expect}
            r["show"][f"every {k}"] = (f"{detailed}/{len(recs)} steps detailed, step_s {f['step_s']['median']:.4g}, "
                                       f"comm_s {f['comm_s']['median']:.4g}")
        r["ran"] = all(x["ok"] for x in r["runs"])
        return r

    def part_plain(self, timeout):
        cfg = {k: self.s[k] for k in ("wide_layers", "wide_batch", "plain_steps", "gemm_n")}
        cfg["compile"], path = not self.args.no_compile, self.work / "plain.json"
        run = run_cmd([sys.executable, SCRIPT, "--worker", "plain", "--device", self.args.device, "--out", str(path),
                       "--worker-config", fileio.dumps(cfg)], timeout, self.logs / "plain")
        f, peak = read_json(path, {}), peak_entry(self.res["device_name"], "bf16")["peak_flops"]
        flops = mfu_table.train_flops_per_sample([int(w) for w in cfg["wide_layers"].split(",")]) * cfg["wide_batch"]
        show = {}
        if f.get("gemm"):
            f["gemm"]["of_peak"] = ratio(f["gemm"]["tflops"] * 1e12, peak)
            show[f"matmul {cfg['gemm_n']}^3 bf16 TFLOP/s (of peak)"] = f"{f['gemm']['tflops']:.4g} ({fmt(f['gemm']['of_peak'])})"
        for k, v in (f.get("variants") or {}).items():
            v |= {"mfu": ratio(ratio(flops, v["step_s"]), peak),
                  "trainer_step_over_this": ratio(self.res.get("trainer_bf16_step_s"), v["step_s"])}
            show[f"plain {k}: step_s, MFU, trainer/this"] = [v["step_s"], v["mfu"], v["trainer_step_over_this"]]
        return {"run": run, "ran": run["ok"], "figures": f, "show": show}


# ---- in-script workers (not the trainer): the environment, and the plain loop's ceiling ------------

def worker(name: str, device: str, out: Path, cfg: dict) -> int:
    import torch
    if name == "env":
        res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device_name": None}
        if device == "cuda":
            p = torch.cuda.get_device_properties(0)
            res |= {"device_name": p.name, "capability": list(torch.cuda.get_device_capability(0)),
                    "sm_count": p.multi_processor_count, "memory_gib": p.total_memory / 2 ** 30,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cudnn": torch.backends.cudnn.version()}
        fileio.write_json(out, res)
        return 0
    import torch.nn.functional as F
    from ddp_fnn.model import build_fnn
    dev, res = torch.device(device), {"variants": {}}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn, steps):
        fn()                                     # the first call (torch.compile compiles)
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - t) / steps

    n = cfg["gemm_n"]
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    t = timed(lambda: torch.mm(a, b), 10)
    res["gemm"] = {"n": n, "s": t, "tflops": 2 * n ** 3 / t / 1e12}
    a = b = None                                 # freed before the model is built
    widths = [int(w) for w in cfg["wide_layers"].split(",")]
    x, y = torch.randn(cfg["wide_batch"], widths[0], device=dev), torch.randn(cfg["wide_batch"], widths[-1], device=dev)
    for variant in ("eager", "compiled")[:1 + cfg["compile"]]:
        try:
            model = build_fnn(widths, seed=0).to(dev)
            fwd = torch.compile(model) if variant == "compiled" else model
            opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = F.mse_loss(fwd(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            res["variants"][variant] = {"step_s": timed(step, cfg["plain_steps"])}
        except Exception as e:
            res["variants"][variant] = {"step_s": None, "error": f"{type(e).__name__}: {str(e)[:1000]}"}
        model = fwd = opt = None
        fileio.write_json(out, res)
    return 0


def fmt(x) -> str:
    if isinstance(x, bool) or x is None:
        return {True: "yes", False: "no", None: "-"}[x]
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(map(fmt, x))
    if isinstance(x, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in x.items())
    return str(x)


def table(parts: dict) -> str:
    """One line a part (its status), then its figures, then a pass/fail line a check."""
    lines = ["| part | item | value |", "|---|---|---|"]
    for name, r in parts.items():
        status = ("DID NOT RUN" if not r.get("ran") else {True: "PASS", False: "FAIL", None: "ran"}[r["passed"]])
        lines.append(f"| **{name}** | **{status}** | {r['wall_s']:.1f} s {r.get('error') or ''} |")
        lines += [f"| | {k} | {fmt(v)} |" for k, v in r["show"].items()]
        lines += [f"| | check {k} | {'pass' if v else 'FAIL'} |" for k, v in r["checks"].items()]
        for run in [r.get("run")] + r.get("runs", []):
            if run and not run["ok"]:
                tail = run["stderr_tail"][-300:].replace("\n", " / ").replace("|", "/")
                lines.append(f"| | rc {run['rc']}, timed out {run['timed_out']} | {tail} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (gpu.json, gpu.md, logs/, artifacts/)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL), or cpu (Gloo: smoke test)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke test)")
    ap.add_argument("--parts", default=",".join(TIMEOUTS), help="comma list of parts (default: all)")
    ap.add_argument("--budget-s", type=float, default=390.0, help="the whole run's time limit in seconds")
    ap.add_argument("--min-part-s", type=float, default=30.0, help="skip a part when less than this is left")
    ap.add_argument("--no-compile", action="store_true", help="plain: no torch.compile variant")
    ap.add_argument("--worker", choices=("env", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.device, Path(args.out), fileio.loads(args.worker_config))
    parts = ["env"] + [p.strip() for p in args.parts.split(",") if p.strip() and p.strip() != "env"]
    if set(parts) - set(TIMEOUTS):                 # env always: MFU needs the device name
        ap.error(f"--parts: unknown {', '.join(sorted(set(parts) - set(TIMEOUTS)))} (known: {', '.join(TIMEOUTS)})")

    def on_signal(signum, _frame):
        for p in list(RUNNING):
            kill_group(p)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"benchmarks/gpu.py: device {args.device}, parts {','.join(parts)}, budget {args.budget_s:.0f} s, "
          f"out {args.out}", flush=True)
    return Driver(args).run(parts)


if __name__ == "__main__":
    sys.exit(main())
