"""The seed chapter's worked example: forward pass, loss, the chain rule by hand,
one SGD update, and PyTorch's autograd as the witness.

The chapter (AI/ML Networking Part III, "Basics of Neural Networks Training Process")
feeds X1 = 1, X2 = 0 through two ReLU hidden neurons H3, H4 and one ReLU output O5,
compares the output Yr with the expected Ye = 2 under L = (Yr - Ye)^2, and updates
W53 with learning rate 0.01. `SEED_SPEC` is that network; `run(spec)` redoes the
arithmetic for it or for any small network given in the same JSON form:

    {"layers": [{"weights": [[...], ...], "bias": [...], "activation": "relu"}, ...],
     "input": [...], "target": [...], "learning_rate": 0.01}

``weights[j][i]`` is the weight from input i to neuron j (out x in, as nn.Linear).

Everything by hand is plain Python floats, so each number can be read off a line:

    forward   Z[l] = W[l] a[l-1] + b[l],   a[l] = f(Z[l]),   a[0] = input,  Yr = a[L]
    loss      L = sum_k (Yr_k - Ye_k)^2
    backward  dL/da[L]  = 2 (Yr - Ye)
              dL/dZ[l]  = dL/da[l] * f'(Z[l])
              dL/dW[l]  = dL/dZ[l] (outer) a[l-1],   dL/db[l] = dL/dZ[l]
              dL/da[l-1] = W[l]^T dL/dZ[l]           (uses the weights *before* the update)
    update    p <- p - learning_rate * dL/dp

Autograd then computes the same gradients from ``model.fnn_from_weights`` in float64
and every one is compared. This module knows nothing of click; the `example`
command in cli.py prints what `run` returns (`format_text`, `to_json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp_fnn.model import ACTIVATIONS, fnn_from_weights

# The chapter's network, Figures 2-2 to 2-4, with the biases its arithmetic uses
# (b3 = 0, b4 = 0.5; its text says the opposite, see CHAPTER_NOTES).
SEED_SPEC: dict = {
    "layers": [
        {"weights": [[0.5, 0.5], [1.0, 1.0]], "bias": [0.0, 0.5], "activation": "relu"},
        {"weights": [[1.0, 1.0]], "bias": [0.5], "activation": "relu"},
    ],
    "input": [1.0, 0.0],
    "target": [2.0],
    "learning_rate": 0.01,
}

# Where the chapter's text disagrees with its own arithmetic (printed with the seed net).
CHAPTER_NOTES: tuple[str, ...] = (
    "The text says H3 and O5 have bias 0.5 and H4 has bias 0, but the arithmetic uses "
    "b3 = 0 (Z3 = 1·0.5 + 0·0.5 + 0 = 0.5) and b4 = 0.5 (Z4 = 1·1 + 0·1 + 0.5 = 1.5). "
    "We follow the arithmetic: only with a3 = 0.5 does dL/dW53 come out as the chapter's 0.5 "
    "(the text's biases give a3 = 1, a4 = 1, the same Yr = 2.5, but dL/dW53 = 1).",
    "The W53 gradient is written dL/dW53 = 2·W53·(Yr − Ye) but computed as 2·0.5·(2.5 − 2), "
    "and 0.5 is a3, not W53 (= 1). The gradient is 2·(Yr − Ye) · ReLU'(Z5) · a3; "
    "the chapter leaves out ReLU'(Z5) because it is 1 here (Z5 = 2.5 > 0).",
    "\"The same computation applies to W54 and b3\" (and Figure 2-5's \"new bias b3\") means b5, "
    "O5's bias: b3 is H3's bias, in the hidden layer, and needs the chain rule.",
    "The chapter updates the output layer and then \"moves to the hidden layer\"; the hidden "
    "gradients must still use the old W53 = W54 = 1 (the weights that produced the loss), "
    "as autograd does. Using the updated 0.995 would give dL/dW31 = 0.995 instead of 1.",
)

# Hand gradients must match autograd this closely (relative, or absolute near zero).
TOLERANCE = 1e-9

_SPEC_KEYS = ("layers", "input", "target", "learning_rate")
_LAYER_KEYS = ("weights", "bias", "activation")
_DISPLAY = {"relu": "ReLU", "identity": "identity", "sigmoid": "sigmoid", "tanh": "tanh"}


class SpecError(ValueError):
    """A spec is malformed; the message is one line naming the problem and the value."""


# ---------------------------------------------------------------------------------------
# The spec: parsing and validation
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One fully connected layer: ``weights[j][i]`` from input i to neuron j."""

    weights: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]
    activation: str


@dataclass(frozen=True)
class Spec:
    """A small network, one input and its target, and the SGD learning rate."""

    layers: tuple[Layer, ...]
    input: tuple[float, ...]
    target: tuple[float, ...]
    learning_rate: float

    @property
    def widths(self) -> list[int]:
        return [len(self.input)] + [len(layer.bias) for layer in self.layers]

    def to_json(self) -> dict:
        return {
            "layers": [{"weights": [list(r) for r in l.weights], "bias": list(l.bias),
                        "activation": l.activation} for l in self.layers],
            "input": list(self.input), "target": list(self.target),
            "learning_rate": self.learning_rate,
        }

    def with_parameters(self, layers: list[tuple[list[list[float]], list[float]]]) -> Spec:
        """The same network with new weights and biases (after an update)."""
        return Spec(
            layers=tuple(Layer(tuple(tuple(r) for r in w), tuple(b), old.activation)
                         for (w, b), old in zip(layers, self.layers)),
            input=self.input, target=self.target, learning_rate=self.learning_rate)


def _show(value) -> str:
    """A value as the user wrote it in JSON, shortened to fit on the error line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise SpecError(f"{where} must be a finite number, got {_show(value)}")
    return float(value)


def _numbers(value, where: str, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where} must be a non-empty list of numbers ({what}), got {_show(value)}")
    return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(value))


def _keys(obj, where: str, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(obj, Mapping):
        raise SpecError(f"{where} must be a JSON object with keys {', '.join(keys)}; got {_show(obj)}")
    for key in keys:
        if key not in obj:
            raise SpecError(f"{where}: missing key {key!r} ({what} needs {', '.join(keys)})")
    for key in obj:
        if key not in keys:
            raise SpecError(f"{where}: unknown key {key!r} ({what} has {', '.join(keys)})")


def _layer(obj, l: int) -> Layer:
    where = f"layers[{l}]"
    _keys(obj, where, _LAYER_KEYS, "a layer")
    rows = obj["weights"]
    if not isinstance(rows, list) or not rows:
        raise SpecError(f"{where}.weights must be a non-empty list of rows, one per neuron, "
                        f"got {_show(rows)}")
    weights = tuple(_numbers(row, f"{where}.weights[{j}]", "one per input") for j, row in enumerate(rows))
    for j, row in enumerate(weights[1:], start=1):
        if len(row) != len(weights[0]):
            raise SpecError(f"{where}.weights is ragged: row 0 has {len(weights[0])} values, "
                            f"row {j} has {len(row)}: {_show(rows[j])}")
    bias = _numbers(obj["bias"], f"{where}.bias", "one per neuron")
    if len(bias) != len(weights):
        raise SpecError(f"{where}.bias has {len(bias)} values but {where}.weights has {len(weights)} "
                        f"rows (one bias per neuron): {_show(obj['bias'])}")
    act = obj["activation"]
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise SpecError(f"{where}.activation {_show(act)} is unknown "
                        f"(choose from {', '.join(ACTIVATIONS)})")
    return Layer(weights, bias, act)


def parse_spec(obj) -> Spec:
    """Validate a decoded JSON spec; raise SpecError naming the first problem and its value."""
    _keys(obj, "spec", _SPEC_KEYS, "a spec")
    raw_layers = obj["layers"]
    if not isinstance(raw_layers, list) or not raw_layers:
        raise SpecError(f"layers must be a non-empty list of layers, got {_show(raw_layers)}")
    layers = tuple(_layer(layer, l) for l, layer in enumerate(raw_layers))
    inputs = _numbers(obj["input"], "input", "one per input of layers[0]")
    target = _numbers(obj["target"], "target", "one per neuron of the last layer")

    fan_in = len(layers[0].weights[0])
    if fan_in != len(inputs):
        raise SpecError(f"layers[0].weights rows have {fan_in} values but input has "
                        f"{len(inputs)}: {_show(obj['input'])}")
    for l in range(1, len(layers)):
        fan_in, below = len(layers[l].weights[0]), len(layers[l - 1].weights)
        if fan_in != below:
            raise SpecError(f"layers[{l}].weights rows have {fan_in} values but layers[{l - 1}] "
                            f"has {below} neurons (one weight per neuron below)")
    last = len(layers) - 1
    if len(target) != len(layers[last].weights):
        raise SpecError(f"target has {len(target)} values but the last layer, layers[{last}], has "
                        f"{len(layers[last].weights)} neurons: {_show(obj['target'])}")

    lr = obj["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise SpecError(f"learning_rate must be a number greater than 0, got {_show(lr)}")
    return Spec(layers, inputs, target, float(lr))


def load_spec(path: str | Path) -> Spec:
    """Read and validate a JSON spec file; every problem is a one-line SpecError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file") from None
    except IsADirectoryError:
        raise SpecError("is a directory, not a JSON file") from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    return parse_spec(obj)


def seed_spec() -> Spec:
    return parse_spec(SEED_SPEC)


# ---------------------------------------------------------------------------------------
# Forward, loss, backward and update by hand
# ---------------------------------------------------------------------------------------

def activate(name: str, z: float) -> float:
    if name == "relu":
        return z if z > 0 else 0.0
    if name == "identity":
        return z
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    if name == "tanh":
        return math.tanh(z)
    raise ValueError(f"unknown activation {name!r}")


def derivative(name: str, z: float, a: float) -> float:
    """da/dZ at Z = z, where a = f(z). ReLU'(0) = 0, as in PyTorch."""
    if name == "relu":
        return 1.0 if z > 0 else 0.0
    if name == "identity":
        return 1.0
    if name == "sigmoid":
        return a * (1.0 - a)
    if name == "tanh":
        return 1.0 - a * a
    raise ValueError(f"unknown activation {name!r}")


@dataclass
class LayerStep:
    """One layer in one iteration: its forward values, its gradients, its update."""

    z: list[float]
    a: list[float]
    dL_da: list[float]                  # dL/da[l], from the layer above (or the loss)
    da_dz: list[float]                  # f'(Z[l])
    dL_dz: list[float]                  # dL/dZ[l] = dL/da[l] * f'(Z[l])
    grad_weights: list[list[float]]     # dL/dW[l][j][i] = dL/dZ[l][j] * a[l-1][i]
    grad_bias: list[float]              # dL/db[l][j]    = dL/dZ[l][j]
    new_weights: list[list[float]]
    new_bias: list[float]
    autograd_weights: list[list[float]]
    autograd_bias: list[float]


@dataclass
class Iteration:
    """One forward/backward/update on ``spec`` (the parameters before the update)."""

    spec: Spec
    layers: list[LayerStep]
    loss: float
    max_autograd_diff: float            # largest |hand - autograd| over every gradient
    agrees: bool                        # every gradient within TOLERANCE of autograd

    @property
    def output(self) -> list[float]:
        return self.layers[-1].a


@dataclass
class Result:
    iterations: list[Iteration]
    final: Spec                         # the parameters after the last update

    @property
    def first(self) -> Iteration:
        return self.iterations[0]

    @property
    def loss_history(self) -> list[float]:
        return [it.loss for it in self.iterations]

    @property
    def agrees(self) -> bool:
        return all(it.agrees for it in self.iterations)


def autograd_gradients(spec: Spec) -> tuple[float, list[tuple[list[list[float]], list[float]]]]:
    """The loss and (dL/dW, dL/db) per layer, by PyTorch autograd in float64."""
    model = fnn_from_weights([(l.weights, l.bias, l.activation) for l in spec.layers], dtype=torch.float64)
    x = torch.tensor([spec.input], dtype=torch.float64)
    target = torch.tensor([spec.target], dtype=torch.float64)
    loss = ((model(x) - target) ** 2).sum()
    loss.backward()
    return loss.item(), [(layer.weight.grad.tolist(), layer.bias.grad.tolist()) for layer in model.layers]


def _close(hand: float, reference: float) -> bool:
    return abs(hand - reference) <= TOLERANCE * max(1.0, abs(reference))


def step(spec: Spec) -> Iteration:
    """Forward, loss, backward by the chain rule, SGD update; then autograd checks it."""
    # ---- forward: Z = W a + b, a = f(Z), layer by layer
    zs: list[list[float]] = []
    acts: list[list[float]] = [list(spec.input)]
    for layer in spec.layers:
        below = acts[-1]
        z = [sum(w * a for w, a in zip(row, below)) + b for row, b in zip(layer.weights, layer.bias)]
        zs.append(z)
        acts.append([activate(layer.activation, v) for v in z])
    output = acts[-1]

    # ---- loss: L = sum_k (Yr_k - Ye_k)^2
    loss = sum((y - t) ** 2 for y, t in zip(output, spec.target))

    # ---- backward: from dL/dYr down, one layer at a time
    n = len(spec.layers)
    dL_da = [2.0 * (y - t) for y, t in zip(output, spec.target)]
    steps: list[LayerStep | None] = [None] * n
    for l in reversed(range(n)):
        layer, z, a, below = spec.layers[l], zs[l], acts[l + 1], acts[l]
        da_dz = [derivative(layer.activation, zj, aj) for zj, aj in zip(z, a)]
        dL_dz = [g * d for g, d in zip(dL_da, da_dz)]
        grad_w = [[dz * ai for ai in below] for dz in dL_dz]
        grad_b = list(dL_dz)
        lr = spec.learning_rate
        steps[l] = LayerStep(
            z=z, a=a, dL_da=dL_da, da_dz=da_dz, dL_dz=dL_dz, grad_weights=grad_w, grad_bias=grad_b,
            new_weights=[[w - lr * g for w, g in zip(row, grow)] for row, grow in zip(layer.weights, grad_w)],
            new_bias=[b - lr * g for b, g in zip(layer.bias, grad_b)],
            autograd_weights=[], autograd_bias=[])
        # dL/da of the layer below sums over every neuron j this layer feeds, with the old W
        dL_da = [sum(dL_dz[j] * layer.weights[j][i] for j in range(len(dL_dz))) for i in range(len(below))]

    # ---- the witness: autograd on the same parameters
    auto_loss, auto = autograd_gradients(spec)
    diffs = [abs(loss - auto_loss)]
    agrees = _close(loss, auto_loss)
    for s, (gw, gb) in zip(steps, auto):
        s.autograd_weights, s.autograd_bias = gw, gb
        for hand_row, auto_row in zip(s.grad_weights + [s.grad_bias], gw + [gb]):
            for h, r in zip(hand_row, auto_row):
                diffs.append(abs(h - r))
                agrees = agrees and _close(h, r)
    return Iteration(spec=spec, layers=steps, loss=loss, max_autograd_diff=max(diffs), agrees=agrees)


def run(spec: Spec, steps: int = 1) -> Result:
    """``steps`` iterations of forward, backward and SGD update on the one example."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    iterations = []
    for _ in range(steps):
        it = step(spec)
        iterations.append(it)
        spec = spec.with_parameters([(s.new_weights, s.new_bias) for s in it.layers])
    return Result(iterations=iterations, final=spec)


def to_json(result: Result, with_history: bool = False) -> dict:
    """The first iteration in the `example --json` contract (one entry per layer, in order)."""
    it = result.first
    out = {
        "layers": [{"z": s.z, "a": s.a} for s in it.layers],
        "output": it.output,
        "loss": it.loss,
        "gradients": [{"weights": s.grad_weights, "bias": s.grad_bias} for s in it.layers],
        "updated": [{"weights": s.new_weights, "bias": s.new_bias} for s in it.layers],
    }
    if with_history:
        out["loss_history"] = result.loss_history
    return out


# ---------------------------------------------------------------------------------------
# Printing, as the chapter writes it
# ---------------------------------------------------------------------------------------

def _f(x: float) -> str:
    """A number for a person: 6 significant digits, no '-0'."""
    return f"{x + 0.0:.6g}"


def _p(x: float) -> str:
    """A number as a factor or term: negatives in parentheses."""
    return f"({_f(x)})" if x < 0 else _f(x)


class Names:
    """What to call each quantity. The seed's shape (2-2-1) gets the chapter's names:
    neurons numbered across layers (X1 X2 | H3 H4 | O5), Z3, a3, W31 (to H3 from X1), b3,
    output Yr, target Ye. Any other net: layer l = 1..L, neuron j = 1..n (1-based),
    Z[l,j], a[l,j], W[l,j,i] (to neuron j of layer l from neuron i below), b[l,j],
    inputs x[i], outputs Yr[k], targets Ye[k]."""

    def __init__(self, widths: list[int]):
        self.widths = widths
        self.chapter = widths == [2, 2, 1]
        self.L = len(widths) - 1

    def _num(self, l: int, j: int) -> int:
        return sum(self.widths[:l]) + j + 1

    def neuron(self, l: int, j: int) -> str:
        if self.chapter:
            return f"{'O' if l == self.L else 'H'}{self._num(l, j)}"
        return f"neuron [{l},{j + 1}]"

    def z(self, l: int, j: int) -> str:
        return f"Z{self._num(l, j)}" if self.chapter else f"Z[{l},{j + 1}]"

    def a(self, l: int, j: int) -> str:
        """The activation; layer 0 is the input, layer L the output Yr."""
        if l == self.L:
            return self.y(j)
        if self.chapter:
            return f"{'X' if l == 0 else 'a'}{self._num(l, j)}"
        return f"x[{j + 1}]" if l == 0 else f"a[{l},{j + 1}]"

    def w(self, l: int, j: int, i: int) -> str:
        if self.chapter:
            return f"W{self._num(l, j)}{self._num(l - 1, i)}"
        return f"W[{l},{j + 1},{i + 1}]"

    def b(self, l: int, j: int) -> str:
        return f"b{self._num(l, j)}" if self.chapter else f"b[{l},{j + 1}]"

    def y(self, k: int) -> str:
        return "Yr" if self.widths[-1] == 1 else f"Yr[{k + 1}]"

    def t(self, k: int) -> str:
        return "Ye" if self.widths[-1] == 1 else f"Ye[{k + 1}]"


def _check_mark(hand: float, auto: float) -> str:
    return f"✓ autograd {_f(auto)}" if _close(hand, auto) else f"✗ autograd {_f(auto)} DISAGREES"


def _derivative_text(act: str, z_name: str, z: float, a: float, d: float) -> str:
    name = _DISPLAY[act]
    if act == "sigmoid":
        return f"{name}'({z_name}) = a·(1 − a) = {_p(a)}·(1 − {_p(a)}) = {_f(d)}"
    if act == "tanh":
        return f"{name}'({z_name}) = 1 − a² = 1 − {_p(a)}² = {_f(d)}"
    return f"{name}'({z_name}) = {name}'({_f(z)}) = {_f(d)}"


def _chain_lines(target: str, factors: list[tuple[str, str, float]], value: float, auto: float,
                 indent: str) -> list[str]:
    """dL/dP = d1 · d2 · ... written three ways: symbols, what each is, numbers."""
    pad = indent + " " * (len(f"dL/d{target} "))
    return [
        f"{indent}dL/d{target} = " + " · ".join(s for s, _, _ in factors),
        f"{pad}= " + " · ".join(m for _, m, _ in factors),
        f"{pad}= " + " · ".join(_p(v) for _, _, v in factors),
        f"{pad}= {_f(value)}    {_check_mark(value, auto)}",
    ]


def format_text(result: Result) -> list[str]:
    """The first iteration written out as the chapter does, then the loss of every step."""
    it = result.first
    spec = it.spec
    names = Names(spec.widths)
    L = names.L
    is_seed = spec == seed_spec()
    out: list[str] = []

    if is_seed:
        out.append("Worked example: the seed chapter's network (Figures 2-2 to 2-5): inputs X1, X2; "
                   "ReLU hidden neurons H3, H4; ReLU output O5.")
    else:
        acts = ", ".join(_DISPLAY[l.activation] for l in spec.layers)
        out.append(f"Worked example: widths {'-'.join(map(str, spec.widths))}, activations {acts}.")
    out.append(f"Loss L = Σ (Yr − Ye)², learning rate η = {_f(spec.learning_rate)}, "
               "SGD update: new = old − η · dL/d(old).")
    out.append("Every gradient is worked out by hand with the chain rule and checked against "
               "PyTorch autograd (float64).")

    # ---- forward
    out += ["", "Forward pass"]
    inputs = ", ".join(f"{names.a(0, i)} = {_f(x)}" for i, x in enumerate(spec.input))
    out.append(f"  inputs: {inputs}")
    for l, (layer, s) in enumerate(zip(spec.layers, it.layers), start=1):
        below = list(spec.input) if l == 1 else it.layers[l - 2].a
        for j in range(len(s.z)):
            label = names.neuron(l, j)
            sym = " + ".join(f"{names.a(l - 1, i)}·{names.w(l, j, i)}" for i in range(len(below)))
            num = " + ".join(f"{_p(below[i])}·{_p(layer.weights[j][i])}" for i in range(len(below)))
            out.append(f"  {label}: {names.z(l, j)} = {sym} + {names.b(l, j)} = {num} + "
                       f"{_p(layer.bias[j])} = {_f(s.z[j])}")
            act = _DISPLAY[layer.activation]
            out.append(f"  {' ' * len(label)}  {names.a(l, j)} = {act}({names.z(l, j)}) = "
                       f"{act}({_f(s.z[j])}) = {_f(s.a[j])}")

    # ---- loss
    out += ["", "Loss"]
    sym = " + ".join(f"({names.y(k)} − {names.t(k)})²" for k in range(len(spec.target)))
    num = " + ".join(f"({_f(y)} − {_p(t)})²" for y, t in zip(it.output, spec.target))
    out.append(f"  L = {sym} = {num} = {_f(it.loss)}")

    # ---- backward, output layer first. chains[j] holds the factors from dL/dYr down to
    # da/dZ of neuron j of the current layer while the path to the output is unique
    # (every layer above is one neuron wide); otherwise we write dL/dZ layer by layer.
    chains: list[list[tuple[str, str, float]]] | None = None
    for l in range(L, 0, -1):
        layer, s = spec.layers[l - 1], it.layers[l - 1]
        below = list(spec.input) if l == 1 else it.layers[l - 2].a
        act = _DISPLAY[layer.activation]
        if l == L:
            title = f"Backward pass, output layer ({', '.join(names.neuron(l, j) for j in range(len(s.z)))})"
            out += ["", title + (": the chapter's formula, with ReLU'(Z5) written out" if is_seed else "")]
            chains = []
            for k in range(len(s.z)):
                y, t, zk = names.y(k), names.t(k), names.z(l, k)
                out.append(f"  dL/d{y} = 2·({y} − {t}) = 2·({_f(s.a[k])} − {_p(spec.target[k])}) = "
                           f"{_f(s.dL_da[k])}")
                out.append(f"  d{y}/d{zk} = " + _derivative_text(layer.activation, zk, s.z[k], s.a[k],
                                                                   s.da_dz[k]))
                chains.append([(f"dL/d{y}", f"2·({y} − {t})", s.dL_da[k]),
                               (f"d{y}/d{zk}", f"{act}'({zk})", s.da_dz[k])])
        else:
            above = spec.layers[l]
            unique = chains is not None and len(above.bias) == 1
            kind = "the chain rule" if unique else "the chain rule, summed over the neurons above"
            out += ["", f"Backward pass, hidden layer {l} "
                        f"({', '.join(names.neuron(l, j) for j in range(len(s.z)))}): {kind}"]
            new_chains = []
            for j in range(len(s.z)):
                zj, aj = names.z(l, j), names.a(l, j)
                deriv = _derivative_text(layer.activation, zj, s.z[j], s.a[j], s.da_dz[j])
                if unique:
                    z_up = names.z(l + 1, 0)
                    out.append(f"  d{z_up}/d{aj} = {names.w(l + 1, 0, j)} = {_f(above.weights[0][j])}"
                               f",   d{aj}/d{zj} = {deriv}")
                    new_chains.append(chains[0] + [(f"d{z_up}/d{aj}", names.w(l + 1, 0, j), above.weights[0][j]),
                                                   (f"d{aj}/d{zj}", f"{act}'({zj})", s.da_dz[j])])
                else:
                    up = it.layers[l]
                    sym = " + ".join(f"dL/d{names.z(l + 1, k)}·{names.w(l + 1, k, j)}"
                                     for k in range(len(up.z)))
                    num = " + ".join(f"{_p(up.dL_dz[k])}·{_p(above.weights[k][j])}" for k in range(len(up.z)))
                    out.append(f"  dL/d{aj} = {sym} = {num} = {_f(s.dL_da[j])}")
                    out.append(f"  d{aj}/d{zj} = {deriv}")
                    out.append(f"  dL/d{zj} = dL/d{aj} · d{aj}/d{zj} = {_p(s.dL_da[j])} · {_p(s.da_dz[j])} "
                               f"= {_f(s.dL_dz[j])}")
            chains = new_chains if unique else None

        # the gradients of this layer's weights and biases
        for j in range(len(s.z)):
            zj = names.z(l, j)
            for i in range(len(below)):
                wn, an = names.w(l, j, i), names.a(l - 1, i)
                g, ag = s.grad_weights[j][i], s.autograd_weights[j][i]
                if chains is not None:
                    out += _chain_lines(wn, chains[j] + [(f"d{zj}/d{wn}", an, below[i])], g, ag, "  ")
                else:
                    out.append(f"  dL/d{wn} = dL/d{zj} · d{zj}/d{wn} = dL/d{zj} · {an} = "
                               f"{_p(s.dL_dz[j])} · {_p(below[i])} = {_f(g)}    {_check_mark(g, ag)}")
            bn = names.b(l, j)
            g, ag = s.grad_bias[j], s.autograd_bias[j]
            if chains is not None:
                out += _chain_lines(bn, chains[j] + [(f"d{zj}/d{bn}", "1", 1.0)], g, ag, "  ")
            else:
                out.append(f"  dL/d{bn} = dL/d{zj} · d{zj}/d{bn} = {_p(s.dL_dz[j])} · 1 = {_f(g)}    "
                           f"{_check_mark(g, ag)}")

    # ---- update, in the same order (output layer first, as the chapter)
    lr = spec.learning_rate
    out += ["", f"SGD update (η = {_f(lr)}): new = old − η · gradient, every gradient from the old weights"]
    for l in range(L, 0, -1):
        layer, s = spec.layers[l - 1], it.layers[l - 1]
        for j in range(len(s.z)):
            for i in range(len(layer.weights[j])):
                out.append(f"  {names.w(l, j, i)} = {_f(layer.weights[j][i])} − {_f(lr)}·"
                           f"{_p(s.grad_weights[j][i])} = {_f(s.new_weights[j][i])}")
            out.append(f"  {names.b(l, j)} = {_f(layer.bias[j])} − {_f(lr)}·{_p(s.grad_bias[j])} = "
                       f"{_f(s.new_bias[j])}")

    # ---- further steps
    if len(result.iterations) > 1:
        out += ["", f"Training: {len(result.iterations)} steps of forward, backward and update on this one "
                    "example (autograd checked at every step)"]
        for n, loss in enumerate(result.loss_history, start=1):
            out.append(f"  step {n}: L = {_f(loss)}")

    # ---- the witness
    worst = max(it.max_autograd_diff for it in result.iterations)
    n_grads = sum(len(l.bias) * (len(l.weights[0]) + 1) for l in spec.layers)
    out.append("")
    if result.agrees:
        out.append(f"Autograd agrees: all {n_grads} gradients, in every step, match PyTorch autograd "
                   f"(largest difference {worst:.1e}).")
    else:
        out.append(f"Autograd DISAGREES with the hand gradients (largest difference {worst:.3g}).")

    if is_seed:
        out += ["", "Where the chapter's text disagrees with its own arithmetic"]
        for n, note in enumerate(CHAPTER_NOTES, start=1):
            out.append(f"  {n}. {note}")
    return out
