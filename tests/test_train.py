"""`ddp-fnn train` as one process: outputs, settings sources, and bad input."""

import json

import pytest
import torch

from conftest import run_cli
from ddp_fnn.model import FNN

QUICK = ("--layers", "8,16,1", "--samples", "512", "--global-batch-size", "32", "--metrics-port", "0",
         "--progress", "none")


def test_single_process_writes_loadable_model_and_summary(tmp_path):
    r = run_cli("train", *QUICK, "--max-steps", "5", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("world_size", "backend", "device", "sync", "compression", "layers", "parameters", "steps",
                "samples", "final_train_loss", "eval_loss", "eval_accuracy", "samples_per_second",
                "step_time_p50_s", "step_time_p95_s"):
        assert key in summary, key
    assert summary["world_size"] == 1 and summary["steps"] == 5 and summary["samples"] == 5 * 32
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    model = FNN(summary["layers"])
    model.load_state_dict(state)                       # plain FNN keys, no "module." prefix
    assert summary["parameters"] == model.num_parameters() == 8 * 16 + 16 + 16 + 1


def test_toml_config_then_env_then_command_line(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('layers = [8, 16, 1]\nsamples = 512\nglobal-batch-size = 32\nmax-steps = 3\n'
                   'metrics-port = 0\nprogress = "none"\nlr = 0.5\n')
    r = run_cli("train", "--config", str(cfg), "--output", str(tmp_path / "a"), env={"DDP_FNN_MAX_STEPS": "4"})
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["steps"] == 4 and s["config"]["lr"] == 0.5           # env beats the file
    r = run_cli("train", "--config", str(cfg), "--max-steps", "2", "--output", str(tmp_path / "b"),
                env={"DDP_FNN_MAX_STEPS": "4"})
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 2   # flag beats env


def test_target_loss_stops_early_in_one_process(tmp_path):
    r = run_cli("train", *QUICK, "--epochs", "50", "--target-loss", "1e9", "--log-every", "4", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["steps"] == 4 and s["stop_reason"] == "target-loss"     # decided at the first log step


def one_line_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.mark.parametrize("args,fragments", [
    (("--lr", "-1"), ("--lr", "-1")),
    (("--global-batch-size", "1", "--grad-accum", "2"), ("--global-batch-size 1", "smaller than world size")),
    (("--data", "/nonexistent/data.csv"), ("/nonexistent/data.csv", "no such file")),
    (("--sync", "carrier-pigeon"), ("--sync", "carrier-pigeon")),
    (("--no-such-option",), ("--no-such-option",)),
    (("--max-steps", "three"), ("--max-steps", "three")),
])
def test_bad_input_is_one_line_exit_2(args, fragments):
    one_line_error(run_cli("train", *QUICK, "--data", "synthetic", *args), *fragments)


def test_unreadable_config_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    one_line_error(run_cli("train", "--config", str(bad)), "not valid TOML")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = 3\n")
    one_line_error(run_cli("train", "--config", str(unknown)), "unknown key 'learning_rate'")


def test_non_numeric_csv_cell_names_file_line_and_column(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("a,b,y\n1,2,3\n4,oops,6\n")
    one_line_error(run_cli("train", *QUICK, "--layers", "2,4,1", "--data", str(f)), "line 3", "'b'", "'oops'")


def test_layer_widths_must_match_the_data(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("a,b,y\n" + "".join(f"{i},{i * 2},{i % 3}\n" for i in range(50)))
    one_line_error(run_cli("train", *QUICK, "--layers", "3,4,1", "--data", str(f)), "input width 3", "2 features")


def test_output_is_not_touched_by_a_run_that_fails_its_checks(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"precious")
    one_line_error(run_cli("train", *QUICK, "--lr", "0", "--output", str(tmp_path)), "--lr")
    assert (tmp_path / "model.pt").read_bytes() == b"precious"


def test_dry_run_validates_without_training(tmp_path):
    r = run_cli("train", *QUICK, "--dry-run", "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["ok"] and plan["train_rows"] == 410 and plan["eval_rows"] == 102
    assert not (tmp_path / "out").exists()


def test_profile_writes_torch_profilers_trace_of_exactly_the_asked_steps(tmp_path):
    """--profile A:B: torch.profiler's own view of steps A..B, strict JSON beside the
    timeline (started before step A, stopped after step B)."""
    from ddp_fnn.core import fileio
    r = run_cli("train", *QUICK, "--max-steps", "6", "--profile", "2:3", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    path = tmp_path / "profile-rank0.json"
    assert summary["profile"] == str(path)
    trace = fileio.loads(path.read_text())                  # strict: no NaN
    assert trace["ddp_fnn"] == {"steps": [2, 3]}
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::addmm") or n.startswith("aten::linear") for n in names)
    assert any("mse_loss" in n for n in names)
    ranges = [e for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ddp_fnn.")]
    assert {e["name"] for e in ranges} == {"ddp_fnn.data", "ddp_fnn.forward", "ddp_fnn.backward",
                                          "ddp_fnn.sync", "ddp_fnn.optimizer"}
    assert sum(e["name"] == "ddp_fnn.forward" for e in ranges) == 2          # one a profiled step
    # One forward addmm per Linear layer (2) per step, for steps 2 and 3 only: a window
    # one step too wide or the whole run (6 steps) would hold more.
    addmm = sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::addmm" and e.get("ph") == "X")
    assert addmm == 2 * 2, addmm


@pytest.mark.parametrize("value,message", [("3:2", "--profile 3:2"), ("x", "--profile x")])
def test_bad_profile_range_is_one_line(tmp_path, value, message):
    r = run_cli("train", *QUICK, "--max-steps", "3", "--profile", value, "--output", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith(f"ddp-fnn: error: {message}") and r.stderr.count("\n") == 1, r.stderr


def test_profile_needs_an_output_directory():
    r = run_cli("train", *QUICK, "--max-steps", "3", "--profile", "1:2")
    assert r.returncode == 2 and "--profile 1:2 needs --output DIR" in r.stderr, r.stderr


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_nan_check_reads_nothing_from_the_device_in_the_micro_steps(tmp_path, policy):
    """torch.profiler's trace of two steps of 4 micro-steps each: no op that reads a value
    back to the host (``.item()``, ``bool()``: aten::_local_scalar_dense, the host sync on
    CUDA) inside any forward or backward, where a per-micro-step check of the loss would
    put one each (8); at most one a step in all (the one non-finite check: read a step
    late with stop, before the optimizer with skip)."""
    from ddp_fnn.core import fileio
    r = run_cli("train", *QUICK, "--max-steps", "6", "--grad-accum", "4", "--global-batch-size", "32",
                "--on-nan", policy, "--profile", "3:4", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    events = [e for e in fileio.loads((tmp_path / "profile-rank0.json").read_text())["traceEvents"]
              if e.get("ph") == "X"]
    reads = [e for e in events if e.get("name") in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")]
    micro = [e for e in events if e.get("name") in ("ddp_fnn.forward", "ddp_fnn.backward")]
    assert len(micro) == 2 * 4 * 2
    inside = [e for e in reads for m in micro if m["ts"] <= e["ts"] <= m["ts"] + m["dur"]]
    assert inside == [], inside
    steps = [e for e in events if e.get("name") == "ddp_fnn.optimizer"]
    assert len(steps) == 2
    in_optimizer = [e for e in reads if e["name"] == "aten::_local_scalar_dense"
                    and any(s["ts"] <= e["ts"] <= s["ts"] + s["dur"] for s in steps)]
    assert len(in_optimizer) == (2 if policy == "skip" else 0), in_optimizer
