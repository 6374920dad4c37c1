"""Settings: each bad value is refused with a message naming the option and the value."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

from ddp_fnn.perfmodel import probe
from ddp_fnn.config import MATH_SECTIONS, ConfigError, TrainConfig, fields_for_cli


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": "4,x,1"}, r"--layers must be comma-separated integers.*'4,x,1'"),
    ({"layers": "4"}, r"--layers needs at least two positive widths"),
    ({"lr": -1.0}, r"--lr must be a positive number, got -1.0"),
    ({"global_batch_size": 0}, r"--global-batch-size must be >= 1, got 0"),
    ({"eval_fraction": 1.0}, r"--eval-fraction must be in \[0, 1\), got 1.0"),
    ({"compression": "fp16", "sync": "allreduce"}, r"--compression fp16 needs --sync ddp"),
    ({"task": "classification", "layers": "4,8,1"}, r"class count"),
    ({"metrics_port": 70000}, r"--metrics-port must be in 0..65535, got 70000"),
    ({"max_steps": 0}, r"--max-steps must be >= 1, got 0"),
    ({"probe_rounds": 0}, r"--probe-rounds must be >= 1, got 0"),
    ({"all_reduce": "hierarchical", "sync": "allreduce"}, r"--all-reduce hierarchical needs --sync ddp and "
     r"--compression none \(got --sync allreduce, --compression none\)"),
    ({"all_reduce": "hierarchical", "compression": "fp16"}, r"--all-reduce hierarchical needs .*--compression fp16"),
    ({"all_reduce": "hierarchical", "bucket_detail_every": 4}, r"--all-reduce hierarchical needs "
     r"--bucket-detail-every 1 .*got 4"),
])
def test_bad_values_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.of(**kwargs)


def test_the_probe_rounds_default_is_the_probes_own():
    assert TrainConfig.of().predict.probe_rounds == probe.PROBE_ROUNDS


def test_any_world_size_with_a_row_for_every_rank_and_micro_step():
    cfg = TrainConfig.of(global_batch_size=100, grad_accum=2)
    assert cfg.check_world(2) == (25, 25)
    assert cfg.check_world(3) == (16, 17)          # 100 rows over 3 x 2 micro-batches
    assert cfg.check_world(50) == (1, 1)
    with pytest.raises(ConfigError, match=r"--global-batch-size 100 is smaller than world size x grad-accum = 51 x 2"):
        cfg.check_world(51)


# ---------------------------------------------------------------------------------------
# sections: flat names outside, sections inside; each module takes only its section
# ---------------------------------------------------------------------------------------

def test_flat_names_land_in_their_sections_and_come_back_flat():
    cfg = TrainConfig.of(lr=0.5, max_steps=7, bucket_mb=2.0, seed=3, output="/tmp/x", layers="4,8,1")
    assert (cfg.optim.lr, cfg.stop.max_steps, cfg.parallel.bucket_mb, cfg.seed) == (0.5, 7, 2.0, 3)
    flat = cfg.to_dict()
    assert flat["lr"] == 0.5 and flat["output"] == "/tmp/x" and flat["layers"] == [4, 8, 1]
    assert TrainConfig.of(**{k: v for k, v in flat.items()}) == cfg
    assert [name for name, *_ in fields_for_cli()] == list(flat)      # one option per setting, no section names
    with pytest.raises(TypeError, match="no setting optim_lr"):
        TrainConfig.of(optim_lr=0.1)


def test_the_fingerprint_is_the_math_sections_less_what_they_mark():
    settings = TrainConfig.of().math_settings()
    for section in MATH_SECTIONS:
        for f in dataclasses.fields(type(getattr(TrainConfig.of(), section))):
            assert (f.name in settings) == f.metadata["fingerprint"], f.name
    assert "seed" in settings
    for bookkeeping in ("max_steps", "target_loss", "log_every", "keep", "metrics_port", "probe_rounds"):
        assert bookkeeping not in settings


def _modules():
    import ddp_fnn
    for info in pkgutil.walk_packages(ddp_fnn.__path__, "ddp_fnn."):
        yield importlib.import_module(info.name)


def test_no_module_but_the_composition_root_takes_the_whole_config():
    """config.py and cli.py define and parse it; job.py, train/setup.py and train/loop.py
    are the run's composition root, which hands every other module its section."""
    root = {"ddp_fnn.config", "ddp_fnn.cli", "ddp_fnn.job", "ddp_fnn.train.setup", "ddp_fnn.train.loop"}
    takers = []
    for module in _modules():
        for _, obj in inspect.getmembers(module):
            fns = [obj] if inspect.isfunction(obj) else (
                [m for _, m in inspect.getmembers(obj, inspect.isfunction)] if inspect.isclass(obj) else [])
            for fn in fns:
                if fn.__module__ != module.__name__:
                    continue                    # imported, judged where it is defined
                if any("TrainConfig" in str(a) for a in fn.__annotations__.values()):
                    takers.append(f"{module.__name__}.{fn.__qualname__}")
    outside = sorted(t for t in takers if t.rsplit(".", 1)[0] not in root and
                     not any(t.startswith(r + ".") for r in root))
    assert outside == [], outside
    assert "ddp_fnn.train.setup.plan" in takers            # the walk sees the ones that do


def test_estimate_bench_and_sweep_take_trains_own_options():
    """One definition a setting: the options estimate, bench and sweep share with train
    have train's help, default and choices (cli.train_option), the sweep's as comma lists."""
    import click

    from ddp_fnn.cli import cli

    def params(command):
        return {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}

    train = params("train")
    for command, names in (("estimate", ("layers", "bucket_mb", "compression")),
                           ("bench", ("backend", "timeout_s")), ("sweep", ())):
        theirs = params(command)
        for name in names:
            assert theirs[name].help == train[name].help, (command, name)
            assert theirs[name].default == train[name].default, (command, name)
            assert getattr(theirs[name].type, "choices", None) == getattr(train[name].type, "choices", None)
    sweep = params("sweep")
    assert sweep["bucket_mbs"].default == f"{train['bucket_mb'].default:g}"
    assert train["bucket_mb"].help in sweep["bucket_mbs"].help
    assert sweep["all_reduces"].default == train["all_reduce"].default
    from ddp_fnn.sweep.grid import AXES
    assert {a.values for a in AXES} <= set(sweep), "every axis of the grid is an option"
