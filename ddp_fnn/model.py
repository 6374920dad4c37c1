"""The feed-forward network every worker holds.

An FNN is a stack of fully connected layers given by its widths
(input, hidden..., output). Hidden layers use ReLU; the output activation is
chosen by the task (identity for regression and for classification logits,
relu as in the seed chapter's example). Each layer can also carry its own
activation, which is how `example --spec` files describe small networks.

This module knows nothing of processes, ranks or metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


class FNN(nn.Module):
    """Fully connected layers ``layers[i]: widths[i] -> widths[i+1]``, each followed by
    its activation. ``state_dict`` keys are ``layers.{i}.weight`` (out x in) and
    ``layers.{i}.bias``, the same at every world size (the DDP wrapper is never saved).
    """

    def __init__(self, widths: Sequence[int], activations: Sequence[str] | None = None,
                 output_activation: str = "identity"):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError(f"layers needs at least an input and an output width, got {widths}")
        if any(w < 1 for w in widths):
            raise ValueError(f"layer widths must be positive, got {widths}")
        n = len(widths) - 1
        if activations is None:
            activations = ["relu"] * (n - 1) + [output_activation]
        activations = list(activations)
        if len(activations) != n:
            raise ValueError(f"{n} layers need {n} activations, got {len(activations)}")
        for name in activations:
            if name not in ACTIVATIONS:
                raise ValueError(f"unknown activation {name!r} (choose from {', '.join(ACTIVATIONS)})")
        self.widths = widths
        self.activation_names = activations
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = nn.ModuleList(ACTIVATIONS[name]() for name in activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.layers, self.activations):
            x = act(layer(x))
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def he_init_(model: FNN, seed: int) -> FNN:
    """He (Kaiming) normal init, fan-in mode: W ~ N(0, std = sqrt(2 / fan_in)), bias = 0.

    Seeded with a private generator so that every rank builds the same replica
    without touching the global RNG.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            fan_in = layer.weight.shape[1]
            layer.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
            layer.bias.zero_()
    return model


def build_fnn(widths: Sequence[int], output_activation: str = "identity", seed: int = 0) -> FNN:
    """The network `train` uses: ReLU hidden layers, He init from ``seed``."""
    return he_init_(FNN(widths, output_activation=output_activation), seed)


def fnn_from_weights(layers: Sequence[tuple[Sequence[Sequence[float]], Sequence[float], str]],
                     dtype: torch.dtype = torch.float64) -> FNN:
    """An FNN with explicit parameters: ``layers`` is ``[(weights, bias, activation), ...]``
    where ``weights[j][i]`` is the weight from input i to neuron j (out x in, as nn.Linear).

    The caller validates shapes (see ``example.parse_spec``); this builds what it is given.
    """
    widths = [len(layers[0][0][0])] + [len(w) for w, _, _ in layers]
    model = FNN(widths, activations=[a for _, _, a in layers]).to(dtype)
    with torch.no_grad():
        for layer, (w, b, _) in zip(model.layers, layers):
            layer.weight.copy_(torch.tensor(w, dtype=dtype))
            layer.bias.copy_(torch.tensor(b, dtype=dtype))
    return model
