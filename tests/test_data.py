"""Sharding and data files: who sees which rows, and what a bad file says."""

import numpy as np
import pytest

from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.data import GlobalBatches, epochs_to_steps, eval_shard, load_dataset


def batches(n_train, B, world, K=1, rank=0, seed=0):
    return GlobalBatches(np.arange(n_train) * 3 + 1, B, seed, rank, world, K)


def test_one_epoch_at_three_ranks_uses_every_sample_once_and_ranks_are_disjoint():
    n_train, B, world = 600, 60, 3
    seen = {r: [] for r in range(world)}
    for r in range(world):
        gb = batches(n_train, B, world, rank=r)
        for step in range(gb.steps_per_epoch):
            for micro in gb.rank_micro_batches(epoch=0, step_in_epoch=step):
                seen[r].extend(micro.tolist())
    everything = [row for r in seen for row in seen[r]]
    assert sorted(everything) == sorted((np.arange(n_train) * 3 + 1).tolist())   # each exactly once
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b])


@pytest.mark.parametrize("world,K", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 4)])
def test_global_batches_do_not_depend_on_world_size(world, K):
    B = 24
    reference = batches(500, B, 1)
    for epoch in range(2):
        for step in range(reference.steps_per_epoch):
            union = np.concatenate([m for r in range(world)
                                    for m in batches(500, B, world, K, rank=r).rank_micro_batches(epoch, step)])
            assert sorted(union.tolist()) == sorted(reference.global_batch(epoch, step).tolist())


def test_each_epoch_is_reshuffled_like_set_epoch():
    gb = batches(100, 10, 2)
    assert not np.array_equal(gb.permutation(0), gb.permutation(1))
    assert sorted(gb.permutation(0)) == sorted(gb.permutation(1))


def test_tail_smaller_than_a_global_batch_is_dropped_not_padded():
    gb = batches(105, 10, 1)
    assert gb.steps_per_epoch == 10


def test_steps_from_epochs_and_max_steps():
    assert epochs_to_steps(10, None, None) == 10
    assert epochs_to_steps(10, 3, None) == 30
    assert epochs_to_steps(10, 3, 7) == 7
    assert epochs_to_steps(10, None, 55) == 55


def test_eval_shards_cover_the_held_out_split_disjointly():
    idx = np.arange(101)
    parts = [eval_shard(idx, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == idx.tolist()


def test_synthetic_data_is_seeded_and_split():
    a = load_dataset(TrainConfig(layers="4,8,1", samples=500, seed=1))
    b = load_dataset(TrainConfig(layers="4,8,1", samples=500, seed=1))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert len(a.eval_idx) == 100 and len(a.train_idx) == 400
    assert not set(a.eval_idx) & set(a.train_idx)


def test_classification_synthetic_labels_are_class_ids():
    ds = load_dataset(TrainConfig(layers="4,8,3", samples=300, task="classification"))
    assert ds.y.dtype == np.int64 and set(np.unique(ds.y)) <= {0, 1, 2}


def test_npy_pair_is_memory_mapped(tmp_path):
    np.save(tmp_path / "big_x.npy", np.random.rand(1000, 5).astype(np.float32))
    np.save(tmp_path / "big_y.npy", np.random.rand(1000).astype(np.float32))
    ds = load_dataset(TrainConfig(layers="5,4,1", data=str(tmp_path / "big_x.npy")))
    assert isinstance(ds.x, np.memmap)
    x, y = ds.fetch(ds.train_idx[:7], device=__import__("torch").device("cpu"))
    assert x.shape == (7, 5) and y.shape == (7, 1)


def test_uncompressed_npz_is_memory_mapped_and_rows_come_back_in_order(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0])
    ds = load_dataset(TrainConfig(layers="3,4,1", data=str(tmp_path / "d.npz"), eval_fraction=0.0))
    assert isinstance(ds.x, np.memmap)
    rows = np.array([7, 2, 11])
    xt, yt = ds.fetch(rows, device=__import__("torch").device("cpu"))
    assert xt[:, 0].tolist() == x[rows, 0].tolist() and yt[:, 0].tolist() == x[rows, 0].tolist()


def test_standardisation_uses_training_split_moments():
    ds = load_dataset(TrainConfig(layers="4,8,1", samples=2000, standardize=True))
    import torch
    x, _ = ds.fetch(ds.train_idx, torch.device("cpu"))
    assert torch.allclose(x.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std(0), torch.ones(4), atol=1e-2)


@pytest.mark.parametrize("content,match", [
    ("a,b,y\n1,2,3\n1,x,3\n", r"line 3, column 'b': not a number: 'x'"),
    ("a,b,y\n1,2\n", r"line 2 has 2 cells, the header has 3"),
    ("", r"empty file"),
    ("a,b,y\n", r"no data rows"),
])
def test_bad_csv_names_file_line_and_column(tmp_path, content, match):
    f = tmp_path / "d.csv"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_dataset(TrainConfig(layers="2,4,1", data=str(f)))


def test_missing_file_and_unknown_target_column(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_dataset(TrainConfig(layers="2,4,1", data=str(tmp_path / "nope.csv")))
    f = tmp_path / "d.csv"
    f.write_text("a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(ConfigError, match="--target 'z': no such column"):
        load_dataset(TrainConfig(layers="2,4,1", data=str(f), target="z"))
