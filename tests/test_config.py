"""Settings: each bad value is refused with a message naming the option and the value."""

import pytest

from ddp_fnn.perfmodel import bench
from ddp_fnn.config import ConfigError, TrainConfig


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
])
def test_bad_values_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


def test_the_probe_rounds_default_is_the_probes_own():
    assert TrainConfig().probe_rounds == bench.PROBE_ROUNDS


def test_any_world_size_with_a_row_for_every_rank_and_micro_step():
    cfg = TrainConfig(global_batch_size=100, grad_accum=2)
    assert cfg.check_world(2) == (25, 25)
    assert cfg.check_world(3) == (16, 17)          # 100 rows over 3 x 2 micro-batches
    assert cfg.check_world(50) == (1, 1)
    with pytest.raises(ConfigError, match=r"--global-batch-size 100 is smaller than world size x grad-accum = 51 x 2"):
        cfg.check_world(51)
