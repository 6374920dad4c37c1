"""checkpoint.py: atomic writes, pruning, fingerprints, falling back past a corrupt file,
RNG and PowerSGD state round trips; `train`'s checkpoint options in one process; and the
ranks agreeing on one resume step when their --checkpoint-dir is not the same storage
(two torchrun "nodes" on this host, slow)."""

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import dataset_of, free_port, gloo_threads_left, run_cli, torchrun
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn import dist as ddist
from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.model import build_fnn
from test_train import QUICK, one_line_error


def _state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# the directory: atomic writes and pruning
# ---------------------------------------------------------------------------------------

def test_atomic_write_leaves_only_the_final_file(tmp_path):
    ckpt.write_atomic({"format": "x", "w": torch.arange(4.0)}, tmp_path / "step-00000001.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    assert torch.equal(torch.load(tmp_path / "step-00000001.pt", weights_only=True)["w"], torch.arange(4.0))


def test_failed_write_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "step-00000001.pt"
    ckpt.write_atomic({"v": 1}, target)
    with pytest.raises(Exception):
        ckpt.write_atomic({"v": lambda: 0}, target)          # cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    assert torch.load(target, weights_only=True) == {"v": 1}


def test_prune_keeps_the_last_k_and_drops_later_steps_and_stale_temporaries(tmp_path):
    for s in (10, 20, 30, 40, 90):
        (tmp_path / ckpt.checkpoint_name(s)).write_bytes(b"x")
    (tmp_path / ".step-00000050.pt.tmp-1234").write_bytes(b"half")   # a writer killed mid-write
    (tmp_path / "notes.txt").write_text("not ours")
    removed = ckpt.prune(tmp_path, newest_step=40, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-00000030.pt", "step-00000040.pt"]
    assert {p.name for p in removed} == {"step-00000010.pt", "step-00000020.pt", "step-00000090.pt",
                                         ".step-00000050.pt.tmp-1234"}


def test_names_sort_by_step():
    names = [ckpt.checkpoint_name(s) for s in (9, 10, 100, 12345678)]
    assert names == sorted(names) and names[0] == "step-00000009.pt"


# ---------------------------------------------------------------------------------------
# fingerprints and choosing what to resume from
# ---------------------------------------------------------------------------------------

def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig.of(**{"layers": (8, 16, 1), "checkpoint_dir": tmp_path, **kw})


def _fp(cfg: TrainConfig, data_identity: str) -> dict:
    return ckpt.fingerprint(cfg.math_settings(), data_identity)


def _resume(cfg: TrainConfig, fp: dict):
    return ckpt.find_resume(cfg.checkpoint, fp)


def _fake_checkpoint(path: Path, fp: dict, step: int) -> None:
    ckpt.write_atomic({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": step, "world_size": 1,
                       "fingerprint": fp, "model": {}, "optimizer": {}, "ranks": []}, path)


def test_fingerprint_mismatch_names_each_setting_old_to_new(tmp_path):
    old = _fp(_cfg(tmp_path, lr=0.01), "synthetic(a)")
    new = _fp(_cfg(tmp_path, lr=0.02, layers=(8, 32, 1)), "synthetic(b)")
    diff = ckpt.fingerprint_diff(old, new)
    assert diff == ["--layers 8,16,1 → 8,32,1", "--lr 0.01 → 0.02", "--data synthetic(a) → synthetic(b)"]
    _fake_checkpoint(tmp_path / ckpt.checkpoint_name(5), old, 5)
    with pytest.raises(ConfigError, match=r"step-00000005\.pt was written with other settings: "
                                          r"--layers 8,16,1 → 8,32,1; --lr 0.01 → 0.02; --data"):
        _resume(_cfg(tmp_path, lr=0.02, layers=(8, 32, 1)), new)


def test_world_size_and_bookkeeping_settings_are_not_in_the_fingerprint(tmp_path):
    a = _fp(_cfg(tmp_path), "d")
    b = _fp(_cfg(tmp_path, bucket_mb=1.0, log_every=3, max_steps=7, keep=1, timeout_s=5), "d")
    assert a == b and "world_size" not in a


def test_corrupt_newest_falls_back_to_the_previous_and_says_so(tmp_path):
    cfg = _cfg(tmp_path)
    fp = _fp(cfg, "d")
    for s in (3, 6, 9):
        _fake_checkpoint(tmp_path / ckpt.checkpoint_name(s), fp, s)
    newest = tmp_path / ckpt.checkpoint_name(9)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])      # truncated
    r = _resume(cfg, fp)
    assert r.path.name == "step-00000006.pt" and r.step == 6
    assert [p.name for p, _ in r.skipped] == ["step-00000009.pt"]


def test_directory_of_only_unreadable_checkpoints_is_refused(tmp_path):
    (tmp_path / ckpt.checkpoint_name(3)).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="none of its 1 checkpoints is readable"):
        _resume(_cfg(tmp_path), _fp(_cfg(tmp_path), "d"))


def test_resume_never_and_empty_directory(tmp_path):
    fp = _fp(_cfg(tmp_path), "d")
    _fake_checkpoint(tmp_path / ckpt.checkpoint_name(3), fp, 3)
    assert _resume(_cfg(tmp_path, resume="never"), fp) is None
    assert _resume(_cfg(tmp_path / "empty"), fp) is None


def test_a_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a ddp-fnn checkpoint"):
        ckpt.read(tmp_path / "other.pt")


def test_read_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"format": ckpt.FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="UnpicklingError"):
        ckpt.read(tmp_path / "evil.pt")


# ---------------------------------------------------------------------------------------
# state round trips
# ---------------------------------------------------------------------------------------

def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.rand(3), random.random(), np.random.rand(), np.random.randn()    # gauss cached, etc.
    ckpt.write_atomic({"rng": ckpt.capture_rng(torch.device("cpu"))}, tmp_path / "r.pt")
    expected = (torch.rand(5), [random.random() for _ in range(5)], np.random.randn(5))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.restore_rng(torch.load(tmp_path / "r.pt", weights_only=True)["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected[0])
    assert [random.random() for _ in range(5)] == expected[1]
    assert np.array_equal(np.random.randn(5), expected[2])


def test_a_model_with_nan_is_never_checkpointed(tmp_path):
    model = build_fnn((4, 8, 1), seed=0)
    with torch.no_grad():
        model.layers[0].weight[0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = ckpt.Checkpointer(tmp_path, 1, 3, 0, 1, torch.device("cpu"), {}, 25.0)
    with pytest.raises(ckpt.NonFiniteError, match="not finite after step 4"):
        saver.save(4, model, opt, syncer=None)
    assert list(tmp_path.iterdir()) == []


def test_parameter_digest_sees_one_flipped_bit():
    a, b = build_fnn((4, 8, 1), seed=0), build_fnn((4, 8, 1), seed=0)
    assert torch.equal(ckpt.parameter_digest(a), ckpt.parameter_digest(b))
    with torch.no_grad():
        w = b.layers[1].weight.view(-1)
        w[3] = torch.nextafter(w[3], torch.tensor(1.0))
    assert not torch.equal(ckpt.parameter_digest(a), ckpt.parameter_digest(b))


@pytest.fixture
def group_of_one():
    """A Gloo group of one in this (pytest's) process, left through ddp_fnn.dist.teardown:
    a bare destroy_process_group() can leave a Gloo worker thread to free the group, which
    aborts the whole test run (docs/shutdown.md, "Groups inside pytest")."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    ddist.teardown()
    assert gloo_threads_left() == 0, "the group's Gloo threads outlived teardown()"


def _step(syncer, optimizer, x, y):
    torch.nn.functional.mse_loss(syncer.model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_powersgd_and_optimizer_state_resume_bitwise(group_of_one, tmp_path):
    """Train 6 steps, checkpoint, train 4 more; a fresh process-state restored from the file
    must produce the same 4 steps bit for bit (PowerSGD error feedback, P/Q memories, its
    RNG, Adam's moments)."""
    from ddp_fnn.observe import Clock, Observer
    from ddp_fnn.train.sync import Synchroniser

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range(10)]

    def fresh():
        model = build_fnn((8, 32, 32, 1), seed=0)
        syncer = Synchroniser(model, "ddp", 1, Observer(Clock(cpu)), compression="powersgd", powersgd_rank=2)
        return model, syncer, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, syncer, opt = fresh()
    for x, y in data[:6]:
        _step(syncer, opt, x, y)
    assert syncer.hook_state.powersgd.iter == 6 and syncer.hook_state.powersgd.error_dict
    saver = ckpt.Checkpointer(tmp_path, 6, 3, 0, 1, cpu, {"k": 1}, 25.0)
    path = saver.save(6, model, opt, syncer)
    for x, y in data[6:]:
        _step(syncer, opt, x, y)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    state = ckpt.read(path)                                     # weights_only=True
    resume = ckpt.Resume(path, state)
    model2 = build_fnn((8, 32, 32, 1), seed=0)
    ckpt.restore(resume, model2, cpu, 0, 1)
    syncer2 = Synchroniser(model2, "ddp", 1, Observer(Clock(cpu)), compression="powersgd", powersgd_rank=2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    assert ckpt.restore_after_wrap(resume, opt2, syncer2, cpu, 0, 1, bucket_mb=25.0)
    for x, y in data[6:]:
        _step(syncer2, opt2, x, y)
    assert _state_dict_equal(model2.state_dict(), expected)


# ---------------------------------------------------------------------------------------
# `train` in one process: resume, fallback, NaN, bad input
# ---------------------------------------------------------------------------------------

def _load_model(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


def test_resumed_run_matches_an_uninterrupted_one_and_skips_a_truncated_newest(tmp_path):
    common = (*QUICK, "--checkpoint-every", "3", "--momentum", "0.9")
    r = run_cli("train", *common, "--max-steps", "14", "--checkpoint-dir", str(tmp_path / "ref"),
                "--output", str(tmp_path / "ref-out"))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *common, "--max-steps", "10", "--checkpoint-dir", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == \
        ["step-00000006.pt", "step-00000009.pt", "step-00000010.pt"]
    newest = tmp_path / "ck" / "step-00000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])                     # truncated mid-write by a crash
    r = run_cli("train", *common, "--max-steps", "14", "--checkpoint-dir", str(tmp_path / "ck"),
                "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step-00000010.pt is unreadable" in warnings[0] \
        and "using step-00000009.pt" in warnings[0], r.stderr
    assert "resuming from" in r.stderr and "step-00000009.pt (step 9 of 14)" in r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 9 and summary["steps"] == 14
    assert _state_dict_equal(_load_model(tmp_path / "out"), _load_model(tmp_path / "ref-out"))
    # the unreadable file went at the first save; the last 3 remain
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == \
        ["step-00000009.pt", "step-00000012.pt", "step-00000014.pt"]


def test_nan_loss_stops_naming_rank_and_step_and_writes_no_nan(tmp_path):
    r = run_cli("train", *QUICK, "--layers", "8,64,64,64,64,1", "--lr", "1e10", "--max-steps", "20",
                "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "1", "--output", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("ddp-fnn: error")]
    assert len(err) == 1 and "rank 0: loss is" in err[0] and "at step 2" in err[0], r.stderr
    assert not (tmp_path / "out" / "model.pt").exists()
    for p in (tmp_path / "ck").glob("step-*.pt"):
        model = torch.load(p, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values()), p


def _data_with_one_nan_row(path: Path, nan_row: int) -> None:
    """``path`` = NAME_x.npy (targets in NAME_y.npy) with a NaN feature in one row. An
    .npy, since a CSV with a NaN is refused at load time (line and column named)."""
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(200, 3)), 6).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], dtype=np.float32))[:, None]
    x[nan_row, 0] = np.nan
    np.save(path, x)
    np.save(path.with_name(path.name[:-6] + "_y.npy"), y)


def _steps_touching(cfg: TrainConfig, row: int, world: int, rank_of: bool = False):
    """Which (1-based) steps' global batches contain data row ``row``, and on which rank."""
    from ddp_fnn.data.datasets import GlobalBatches
    ds = dataset_of(cfg)
    hits = []
    for r in range(world):
        b = GlobalBatches(ds.train_idx, cfg.optim.global_batch_size, cfg.seed, r, world, cfg.optim.grad_accum)
        total = b.steps_per_epoch * (cfg.stop.epochs or 1)
        for step in range(total):
            e, pos = divmod(step, b.steps_per_epoch)
            if any(row in mb for mb in b.rank_micro_batches(e, pos)):
                hits.append((step + 1, r))
    return sorted(hits)


def test_on_nan_skip_skips_exactly_the_steps_with_the_bad_row(tmp_path):
    data = tmp_path / "d_x.npy"
    _data_with_one_nan_row(data, nan_row=17)
    args = ("--layers", "3,8,1", "--data", str(data), "--global-batch-size", "16", "--epochs", "3",
            "--metrics-port", "0", "--progress", "none", "--eval-fraction", "0.1")
    cfg = TrainConfig.of(layers=(3, 8, 1), data=str(data), global_batch_size=16, epochs=3, eval_fraction=0.1)
    hits = _steps_touching(cfg, 17, 1)
    assert hits, "row 17 must be in the training split for this test"
    r = run_cli("train", *args, "--on-nan", "skip", "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_steps"] == len(hits)
    for step, _ in hits:
        assert f"step {step}: non-finite loss on rank 0; skipped on every rank" in r.stderr
    assert all(torch.isfinite(t).all() for t in _load_model(tmp_path / "out").values())
    r = run_cli("train", *args, "--output", str(tmp_path / "stop"))
    assert r.returncode == 1 and f"rank 0: loss is nan at step {hits[0][0]} " in r.stderr, r.stderr


@pytest.mark.parametrize("args,fragments", [
    (("--checkpoint-every", "5"), ("--checkpoint-every 5 needs --checkpoint-dir",)),
    (("--checkpoint-dir", "{tmp}/ck", "--keep", "0"), ("--keep must be >= 1", "got 0")),
    (("--checkpoint-dir", "{tmp}/ck", "--checkpoint-every", "0"), ("--checkpoint-every must be >= 1",)),
    (("--resume", "{tmp}/nope.pt"), ("--resume", "nope.pt", "no such checkpoint file")),
    (("--checkpoint-dir", "{tmp}/file/ck"), ("--checkpoint-dir", "not a directory")),
    (("--on-nan", "ignore"), ("--on-nan", "ignore")),
    (("--check-replicas-every", "-1"), ("--check-replicas-every must be >= 0",)),
])
def test_checkpoint_bad_input_is_one_line_exit_2(tmp_path, args, fragments):
    (tmp_path / "file").write_text("a regular file")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    one_line_error(run_cli("train", *QUICK, *args), *[f.replace("{tmp}", str(tmp_path)) for f in fragments])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_checkpoint_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_error(run_cli("train", *QUICK, "--checkpoint-dir", str(ro)), "--checkpoint-dir", "not writable")
    finally:
        ro.chmod(0o700)


def test_unreadable_resume_file_is_refused(tmp_path):
    bad = tmp_path / "step-00000003.pt"
    bad.write_bytes(b"PK\x03\x04 not really")
    one_line_error(run_cli("train", *QUICK, "--resume", str(bad)), "--resume", "not a readable checkpoint")


def test_mismatched_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path):
    ck, out = tmp_path / "ck", tmp_path / "out"
    r = run_cli("train", *QUICK, "--max-steps", "4", "--checkpoint-dir", str(ck), "--output", str(out))
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in [*ck.iterdir(), *out.iterdir()]}
    line = one_line_error(run_cli("train", *QUICK, "--max-steps", "8", "--lr", "0.02", "--layers", "8,32,1",
                                  "--checkpoint-dir", str(ck), "--output", str(out)),
                          "step-00000004.pt was written with other settings")
    assert "--layers 8,16,1 → 8,32,1" in line and "--lr 0.01 → 0.02" in line
    assert {p.name: p.read_bytes() for p in [*ck.iterdir(), *out.iterdir()]} == before


def test_powersgd_state_at_another_world_size_keeps_iter_and_rng_and_drops_memories():
    from types import SimpleNamespace

    from ddp_fnn.train.sync import Synchroniser

    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    old = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    old.iter, old.error_dict, old.p_memory_dict, old.q_memory_dict = 7, {0: torch.ones(5)}, {0: torch.ones(4)}, \
        {0: torch.ones(3)}
    old.rng.randint(10)
    saved = Synchroniser.state_dict(SimpleNamespace(hook_state=SimpleNamespace(powersgd=old)))
    new = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
    syncer = SimpleNamespace(hook_state=SimpleNamespace(powersgd=new))
    assert not Synchroniser.load_state_dict(syncer, saved, torch.device("cpu"), exact=False)
    assert new.iter == 7 and new.error_dict == new.p_memory_dict == new.q_memory_dict == {}
    assert new.rng.randint(1 << 30) == old.rng.randint(1 << 30)
    assert Synchroniser.load_state_dict(syncer, saved, torch.device("cpu"), exact=True)
    assert torch.equal(new.error_dict[0], torch.ones(5)) and torch.equal(new.q_memory_dict[0], torch.ones(3))


def test_a_field_added_to_the_optim_section_resumes_at_its_default_and_refuses_otherwise(tmp_path, monkeypatch):
    """Nobody lists the new field anywhere: being in a math section fingerprints it. A
    checkpoint written before it existed was computed as its default computes: it
    resumes with the field at its default and is refused with any other value."""
    from ddp_fnn import config
    from ddp_fnn.config import OptimConfig, opt

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OptimWithNesterov(OptimConfig):
        nesterov: bool = opt(False, "Nesterov momentum.", flag=True)

    before = _cfg(tmp_path)
    _fake_checkpoint(tmp_path / ckpt.checkpoint_name(5), _fp(before, "d"), 5)
    assert _resume(before, _fp(before, "d")).step == 5           # the same settings resume
    defaults = {**config.math_defaults(), "nesterov": False}     # the release that adds the field
    monkeypatch.setattr(ckpt, "math_defaults", lambda: defaults)
    at_default = dataclasses.replace(before, optim=OptimWithNesterov(**before.optim.to_dict()))
    assert "nesterov" in _fp(at_default, "d")
    assert _resume(at_default, _fp(at_default, "d")).step == 5
    changed = dataclasses.replace(before, optim=OptimWithNesterov(**before.optim.to_dict(), nesterov=True))
    with pytest.raises(ConfigError, match=r"step-00000005\.pt was written with other settings: "
                                          r"--nesterov False → True"):
        _resume(changed, _fp(changed, "d"))


# ---------------------------------------------------------------------------------------
# the ranks agree on one resume step (storage that is not shared, or lags)
# ---------------------------------------------------------------------------------------

def test_common_step_is_the_newest_step_on_every_rank():
    assert ckpt.common_step([[9, 6, 3], [6, 3]]) == 6
    assert ckpt.common_step([[9, 6], [9, 6], [6]]) == 6
    assert ckpt.common_step([[9, 6, 3], []]) is None
    assert ckpt.common_step([[9], [6]]) is None
    assert ckpt.common_step([[4]]) == 4


def test_readable_steps_offers_only_older_files_that_read_whole_with_these_settings(tmp_path):
    cfg = _cfg(tmp_path)
    fp = _fp(cfg, "d")
    for s in (2, 4, 6, 8, 10):
        _fake_checkpoint(tmp_path / ckpt.checkpoint_name(s), fp, s)
    _fake_checkpoint(tmp_path / ckpt.checkpoint_name(2), _fp(_cfg(tmp_path, lr=0.5), "d"), 2)   # other settings
    (tmp_path / ckpt.checkpoint_name(6)).write_bytes(b"garbage")                        # corrupt, older
    (tmp_path / ckpt.checkpoint_name(10)).write_bytes(b"garbage")                       # corrupt, newest
    chosen = _resume(cfg, fp)
    assert chosen.step == 8
    assert [(s, p.name) for s, p in ckpt.readable_steps(cfg.checkpoint, fp, chosen)] == \
        [(8, "step-00000008.pt"), (4, "step-00000004.pt")]
    assert ckpt.readable_steps(cfg.checkpoint, fp, None) == []
    explicit = _cfg(tmp_path, resume=str(tmp_path / ckpt.checkpoint_name(4)))
    assert [s for s, _ in ckpt.readable_steps(explicit.checkpoint, fp, _resume(explicit, fp))] == [4]


def test_only_a_multi_rank_run_that_may_resume_gathers_steps(tmp_path):
    from ddp_fnn.train import setup

    def steps(directory, world, **kw):
        return setup.plan(_cfg(directory, samples=256, global_batch_size=32, **kw), 0, world).resume_steps

    cfg = _cfg(tmp_path, samples=256, global_batch_size=32)
    _fake_checkpoint(tmp_path / ckpt.checkpoint_name(3), _fp(cfg, dataset_of(cfg).identity), 3)
    assert steps(tmp_path, 1) is None                          # world size 1: no collective
    assert [s for s, _ in steps(tmp_path, 2)] == [3]
    assert steps(tmp_path, 2, resume="never") is None
    assert steps(None, 2) is None                              # no --checkpoint-dir
    assert steps(tmp_path / "empty", 2) == ()                  # none here, but must learn of the others'


AGREE = (*QUICK, "--momentum", "0.9")


def _two_nodes(tmp: Path, dirs: tuple[Path, Path], *args: str, timeout: float = 300) -> list[tuple[int, str]]:
    """One torchrun per "node" (static rendezvous on loopback: node N is rank N), each with
    its own --checkpoint-dir, as on two hosts with local disks; (exit status, stderr) each."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, errs = [], []
    for node, directory in enumerate(dirs):
        err = tmp / f"node{node}.err"
        errs.append(err)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", "--monitor-interval=0.1",
               "-m", "ddp_fnn", "train", *args, "--checkpoint-dir", str(directory)]
        with open(err, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env))
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(c, e.read_text()) for c, e in zip(codes, errs)]


@pytest.fixture(scope="module")
def two_rank_checkpoints(tmp_path_factory):
    """A 2-rank run of 9 steps: checkpoints at 3, 6, 9 (ck) and its model.pt (out)."""
    tmp = tmp_path_factory.mktemp("two-rank")
    r = torchrun(2, "train", *AGREE, "--max-steps", "9", "--checkpoint-every", "3",
                 "--checkpoint-dir", str(tmp / "ck"), "--output", str(tmp / "out"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp / "ck").iterdir()) == ["step-00000003.pt", "step-00000006.pt",
                                                               "step-00000009.pt"]
    return tmp


@pytest.mark.slow
def test_ranks_with_different_newest_checkpoints_resume_at_the_common_step(tmp_path, two_rank_checkpoints):
    """Rank 0's directory has 3, 6, 9; rank 1's copy lags (3, 6). Both resume from 6 and end
    bitwise where a run resumed from 6 on both ranks ends (and the uninterrupted run). Step 9
    is --max-steps: rank 0 alone would call the run finished and leave rank 1 hanging."""
    src = two_rank_checkpoints / "ck"
    ck0, ck1, shared = tmp_path / "ck0", tmp_path / "ck1", tmp_path / "shared"
    shutil.copytree(src, ck0)
    for d in (ck1, shared):
        d.mkdir()
        for s in (3, 6):
            shutil.copy2(src / ckpt.checkpoint_name(s), d)
    (c0, err0), (c1, err1) = _two_nodes(tmp_path, (ck0, ck1), *AGREE, "--max-steps", "9",
                                        "--output", str(tmp_path / "out"))
    assert c0 == 0 and c1 == 0, err0 + err1
    notes = [line for line in err0.splitlines() if line.startswith("ddp-fnn: note:")]
    assert notes[0] == ("ddp-fnn: note: checkpoint step 9 is missing or unreadable on rank 1 (storage not shared, "
                        "or lagging?); every rank resumes from step 6, the newest that every rank can read"), err0
    assert "step-00000006.pt (step 6 of 9)" in notes[1] and "already finished" not in err0, err0
    assert not err1.strip(), err1                                          # rank 1 says nothing
    r = torchrun(2, "train", *AGREE, "--max-steps", "9", "--checkpoint-dir", str(shared),
                 "--output", str(tmp_path / "ref"))
    assert r.returncode == 0 and "step-00000006.pt (step 6 of 9)" in r.stderr, r.stderr
    assert "missing or unreadable" not in r.stderr                          # shared: nothing to say
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 9
    model = _load_model(tmp_path / "out")
    assert _state_dict_equal(model, _load_model(tmp_path / "ref"))
    assert _state_dict_equal(model, _load_model(two_rank_checkpoints / "out"))


@pytest.mark.slow
def test_no_step_readable_on_every_rank_is_one_line_exit_2_naming_each_ranks_steps(tmp_path, two_rank_checkpoints):
    """Rank 1's directory is empty (node-local disks; only rank 0 writes checkpoints)."""
    ck0, ck1 = tmp_path / "ck0", tmp_path / "ck1"
    shutil.copytree(two_rank_checkpoints / "ck", ck0)
    ck1.mkdir()
    before = {p.name: p.read_bytes() for p in ck0.iterdir()}
    results = _two_nodes(tmp_path, (ck0, ck1), *AGREE, "--max-steps", "12", "--output", str(tmp_path / "out"))
    for code, err in results:
        assert code != 0, err
        assert "exitcode  : 2 " in err, err                                 # torchrun's report of the worker
        lines = [line for line in err.splitlines() if line.startswith("ddp-fnn:")]
        assert lines == ["ddp-fnn: error: no checkpoint step is readable on every rank (rank 0: steps 3,6,9; "
                         "rank 1: none): each rank must see rank 0's checkpoints (shared --checkpoint-dir, "
                         "or copies), or use --resume never to start afresh"], err
        assert "ddp_fnn/" not in err, err                                  # no worker traceback
    assert {p.name: p.read_bytes() for p in ck0.iterdir()} == before and not list(ck1.iterdir())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
