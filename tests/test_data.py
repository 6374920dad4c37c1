"""Sharding and data files: who sees which rows, and what a bad file says."""

import numpy as np
import pytest

from conftest import dataset_of

from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.data.datasets import GlobalBatches, epochs_to_steps, eval_shard


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


@pytest.mark.parametrize("world,K", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 4), (5, 1), (7, 3), (4, 5)])
def test_global_batches_do_not_depend_on_world_size(world, K):
    B = 24
    reference = batches(500, B, 1)
    for epoch in range(2):
        for step in range(reference.steps_per_epoch):
            union = np.concatenate([m for r in range(world)
                                    for m in batches(500, B, world, K, rank=r).rank_micro_batches(epoch, step)])
            assert sorted(union.tolist()) == sorted(reference.global_batch(epoch, step).tolist())


@pytest.mark.parametrize("B,world,K", [(256, 3, 1), (256, 3, 2), (256, 6, 1), (10, 3, 2), (25, 4, 3), (7, 7, 1)])
def test_uneven_shards_differ_by_at_most_one_row_and_every_micro_step_has_rows(B, world, K):
    sizes = [[len(m) for m in batches(600, B, world, K, rank=r).rank_micro_batches(0, 1)] for r in range(world)]
    shard = [sum(s) for s in sizes]
    assert sum(shard) == B and max(shard) - min(shard) <= 1
    flat = [n for s in sizes for n in s]
    assert min(flat) >= 1 and max(flat) - min(flat) <= 1
    assert [batches(600, B, world, K, rank=r).rank_rows for r in range(world)] == shard


def test_equal_shards_keep_the_old_split_and_the_division_by_k():
    """The fast path: G_t[r::N] cut into K slices of B/(N*K), loss / K."""
    import torch
    gb = batches(500, 24, 3, K=2, rank=1)
    shard = gb.global_batch(0, 3)[1::3]
    assert [m.tolist() for m in gb.rank_micro_batches(0, 3)] == [shard[:4].tolist(), shard[4:].tolist()]
    loss = torch.tensor(0.3)
    assert gb.even and torch.equal(gb.weighted(loss, 4), loss / 2)


def test_too_small_a_global_batch_for_the_world_is_refused():
    with pytest.raises(ConfigError, match=r"--global-batch-size 5 is smaller than world size x grad-accum = 3 x 2"):
        batches(100, 5, 3, K=2)


@pytest.mark.parametrize("B,world,K", [(256, 3, 1), (256, 3, 2), (50, 4, 3), (24, 3, 2)])
def test_weighted_losses_averaged_equally_give_the_global_batch_gradient(B, world, K):
    """What DDP computes, written out: each rank sums its weighted micro-batch gradients,
    the ranks are averaged with weight 1/N; the witness is autograd on the mean loss over
    the whole global batch in one piece (float64)."""
    import torch
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(600, 5, generator=g, dtype=torch.float64), torch.randn(600, 1, generator=g, dtype=torch.float64)
    w = torch.randn(5, 1, generator=g, dtype=torch.float64, requires_grad=True)

    def grad_of(loss):
        (gw,) = torch.autograd.grad(loss, w)
        return gw

    ref = batches(600, B, 1)
    rows = (ref.global_batch(0, 1) - 1) // 3          # back to 0..599
    witness = grad_of(torch.nn.functional.mse_loss(x[rows] @ w, y[rows]))
    ranks = []
    for r in range(world):
        gb = batches(600, B, world, K, rank=r)
        total = torch.zeros_like(w)
        for micro in gb.rank_micro_batches(0, 1):
            i = (micro - 1) // 3
            total += grad_of(gb.weighted(torch.nn.functional.mse_loss(x[i] @ w, y[i]), len(i)))
        ranks.append(total)
    averaged = sum(ranks) / world
    assert torch.allclose(averaged, witness, rtol=1e-12, atol=1e-15)
    if B % (world * K):                               # and plain 1/K weights would not be
        naive = sum(sum(grad_of(torch.nn.functional.mse_loss(x[(m - 1) // 3] @ w, y[(m - 1) // 3])) / K
                        for m in batches(600, B, world, K, rank=r).rank_micro_batches(0, 1))
                    for r in range(world)) / world
        assert not torch.allclose(naive, witness, rtol=1e-9, atol=0)


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
    a = dataset_of(TrainConfig.of(layers="4,8,1", samples=500, seed=1))
    b = dataset_of(TrainConfig.of(layers="4,8,1", samples=500, seed=1))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert len(a.eval_idx) == 100 and len(a.train_idx) == 400
    assert not set(a.eval_idx) & set(a.train_idx)


def test_classification_synthetic_labels_are_class_ids():
    ds = dataset_of(TrainConfig.of(layers="4,8,3", samples=300, task="classification"))
    assert ds.y.dtype == np.int64 and set(np.unique(ds.y)) <= {0, 1, 2}


def test_npy_pair_is_memory_mapped(tmp_path):
    np.save(tmp_path / "big_x.npy", np.random.rand(1000, 5).astype(np.float32))
    np.save(tmp_path / "big_y.npy", np.random.rand(1000).astype(np.float32))
    ds = dataset_of(TrainConfig.of(layers="5,4,1", data=str(tmp_path / "big_x.npy")))
    assert isinstance(ds.x, np.memmap)
    x, y = ds.fetch(ds.train_idx[:7], device=__import__("torch").device("cpu"))
    assert x.shape == (7, 5) and y.shape == (7, 1)


def test_uncompressed_npz_is_memory_mapped_and_rows_come_back_in_order(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.savez(tmp_path / "d.npz", x=x, y=x[:, 0])
    ds = dataset_of(TrainConfig.of(layers="3,4,1", data=str(tmp_path / "d.npz"), eval_fraction=0.0))
    assert isinstance(ds.x, np.memmap)
    rows = np.array([7, 2, 11])
    xt, yt = ds.fetch(rows, device=__import__("torch").device("cpu"))
    assert xt[:, 0].tolist() == x[rows, 0].tolist() and yt[:, 0].tolist() == x[rows, 0].tolist()


def test_standardisation_uses_training_split_moments():
    ds = dataset_of(TrainConfig.of(layers="4,8,1", samples=2000, standardize=True))
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
        dataset_of(TrainConfig.of(layers="2,4,1", data=str(f)))


def test_missing_file_and_unknown_target_column(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        dataset_of(TrainConfig.of(layers="2,4,1", data=str(tmp_path / "nope.csv")))
    f = tmp_path / "d.csv"
    f.write_text("a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(ConfigError, match="--target 'z': no such column"):
        dataset_of(TrainConfig.of(layers="2,4,1", data=str(f), target="z"))
