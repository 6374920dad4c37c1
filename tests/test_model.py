"""The FNN: shapes, explicit weights, and the He init's spread."""

import math

import pytest
import torch

from ddp_fnn.model import FNN, build_fnn, fnn_from_weights


def test_he_init_std_matches_sqrt_two_over_fan_in():
    # A wide layer gives enough samples (512 x 1024) for the empirical std to be tight.
    model = build_fnn([1024, 512, 256], seed=3)
    for layer in model.layers:
        fan_in = layer.weight.shape[1]
        expected = math.sqrt(2.0 / fan_in)
        assert abs(layer.weight.std().item() / expected - 1.0) < 0.05
        assert abs(layer.weight.mean().item()) < 0.05 * expected
        assert torch.count_nonzero(layer.bias) == 0


def test_same_seed_same_replica_and_different_seed_differs():
    a, b, c = build_fnn([8, 16, 1], seed=1), build_fnn([8, 16, 1], seed=1), build_fnn([8, 16, 1], seed=2)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_hidden_layers_relu_and_output_activation_configurable():
    model = FNN([3, 4, 4, 2], output_activation="identity")
    assert model.activation_names == ["relu", "relu", "identity"]
    out = model(torch.randn(5, 3))
    assert out.shape == (5, 2)


def test_from_weights_uses_out_by_in_layout():
    model = fnn_from_weights([([[0.5, 0.5], [1.0, 1.0]], [0.0, 0.5], "relu"), ([[1.0, 1.0]], [0.5], "relu")])
    assert model.widths == [2, 2, 1]
    y = model(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert y.item() == pytest.approx(2.5)


@pytest.mark.parametrize("widths", [[4], [4, 0, 1]])
def test_bad_widths_rejected(widths):
    with pytest.raises(ValueError, match="width"):
        FNN(widths)
