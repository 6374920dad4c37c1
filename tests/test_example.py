"""The worked example: the seed chapter's numbers come out of our code, the hand-written
chain rule equals PyTorch autograd on any small network, and bad specs fail in one line."""

import json
import random

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, run_cli
from ddp_fnn import example
from ddp_fnn.cli import cli, main
from ddp_fnn.model import ACTIVATIONS, fnn_from_weights

SEED_FILE = REPO / "docs" / "seed-example.json"

# The seed chapter's network worked through once, every number by hand:
#   Z3 = 1*0.5 + 0*0.5 + 0 = 0.5      Z4 = 1*1 + 0*1 + 0.5 = 1.5      Z5 = 0.5*1 + 1.5*1 + 0.5 = 2.5
#   L = (2.5 - 2)^2 = 0.25,  dL/dYr = 2*(2.5 - 2) = 1,  every ReLU' = 1 (all Z > 0)
#   output:  dL/dW53 = 1*1*a3 = 0.5   dL/dW54 = 1*1*a4 = 1.5   dL/db5 = 1
#   hidden:  dL/dW31 = 1*1*W53*1*X1 = 1   dL/dW32 = ...*X2 = 0   dL/db3 = 1   (same for H4 with W54 = 1)
SEED_JSON = {
    "layers": [{"z": [0.5, 1.5], "a": [0.5, 1.5]}, {"z": [2.5], "a": [2.5]}],
    "output": [2.5],
    "loss": 0.25,
    "gradients": [{"weights": [[1.0, 0.0], [1.0, 0.0]], "bias": [1.0, 1.0]},
                  {"weights": [[0.5, 1.5]], "bias": [1.0]}],
    "updated": [{"weights": [[0.49, 0.5], [0.99, 1.0]], "bias": [-0.01, 0.49]},
                {"weights": [[0.995, 0.985]], "bias": [0.49]}],
}

# What `ddp-fnn example` prints for the seed, line by line as the chapter writes it.
SEED_LINES = [
    # forward pass
    "H3: Z3 = X1·W31 + X2·W32 + b3 = 1·0.5 + 0·0.5 + 0 = 0.5",
    "a3 = ReLU(Z3) = ReLU(0.5) = 0.5",
    "H4: Z4 = X1·W41 + X2·W42 + b4 = 1·1 + 0·1 + 0.5 = 1.5",
    "a4 = ReLU(Z4) = ReLU(1.5) = 1.5",
    "O5: Z5 = a3·W53 + a4·W54 + b5 = 0.5·1 + 1.5·1 + 0.5 = 2.5",
    "Yr = ReLU(Z5) = ReLU(2.5) = 2.5",
    # loss
    "L = (Yr − Ye)² = (2.5 − 2)² = 0.25",
    # output layer, the chapter's formula
    "dL/dYr = 2·(Yr − Ye) = 2·(2.5 − 2) = 1",
    "dL/dW53 = dL/dYr · dYr/dZ5 · dZ5/dW53",
    "= 2·(Yr − Ye) · ReLU'(Z5) · a3",
    "= 1 · 1 · 0.5",
    "= 0.5    ✓ autograd 0.5",
    "= 1.5    ✓ autograd 1.5",
    # hidden layer, the chain rule written out with each factor's number
    "dZ5/da3 = W53 = 1,   da3/dZ3 = ReLU'(Z3) = ReLU'(0.5) = 1",
    "dL/dW31 = dL/dYr · dYr/dZ5 · dZ5/da3 · da3/dZ3 · dZ3/dW31",
    "= 2·(Yr − Ye) · ReLU'(Z5) · W53 · ReLU'(Z3) · X1",
    "= 1 · 1 · 1 · 1 · 1",
    "dL/dW32 = dL/dYr · dYr/dZ5 · dZ5/da3 · da3/dZ3 · dZ3/dW32",
    "= 1 · 1 · 1 · 1 · 0",
    "dL/dW41 = dL/dYr · dYr/dZ5 · dZ5/da4 · da4/dZ4 · dZ4/dW41",
    "= 2·(Yr − Ye) · ReLU'(Z5) · W54 · ReLU'(Z4) · X1",
    "dL/db4 = dL/dYr · dYr/dZ5 · dZ5/da4 · da4/dZ4 · dZ4/db4",
    # every updated weight and bias
    "W53 = 1 − 0.01·0.5 = 0.995",
    "W54 = 1 − 0.01·1.5 = 0.985",
    "b5 = 0.5 − 0.01·1 = 0.49",
    "W31 = 0.5 − 0.01·1 = 0.49",
    "W32 = 0.5 − 0.01·0 = 0.5",
    "b3 = 0 − 0.01·1 = -0.01",
    "W41 = 1 − 0.01·1 = 0.99",
    "W42 = 1 − 0.01·0 = 1",
    "b4 = 0.5 − 0.01·1 = 0.49",
    "Autograd agrees: all 9 gradients",
]


def assert_prints_the_seed(text: str) -> None:
    for line in SEED_LINES:
        assert line in text, f"missing: {line}"
    assert text.count("✓ autograd") == 9          # every weight and bias, each checked
    assert "DISAGREES" not in text
    # the chapter's inconsistencies are pointed out
    notes = text[text.index("Where the chapter's text disagrees"):]
    assert "b3 = 0" in notes and "b4 = 0.5" in notes
    assert "2·W53·(Yr − Ye)" in notes and "0.5 is a3" in notes
    assert "means b5" in notes


def autograd_reference(spec: example.Spec):
    """Loss and per-layer (dW, db) straight from torch, float64, independent of example.py."""
    model = fnn_from_weights([(l.weights, l.bias, l.activation) for l in spec.layers])
    x = torch.tensor([spec.input], dtype=torch.float64)
    loss = ((model(x) - torch.tensor([spec.target], dtype=torch.float64)) ** 2).sum()
    loss.backward()
    return loss.item(), [(l.weight.grad, l.bias.grad) for l in model.layers]


def assert_hand_equals_autograd(spec: example.Spec) -> None:
    it = example.step(spec)
    loss, grads = autograd_reference(spec)
    assert it.loss == pytest.approx(loss, abs=1e-6)
    for s, (gw, gb) in zip(it.layers, grads):
        assert torch.allclose(torch.tensor(s.grad_weights, dtype=torch.float64), gw, atol=1e-6, rtol=0)
        assert torch.allclose(torch.tensor(s.grad_bias, dtype=torch.float64), gb, atol=1e-6, rtol=0)
    assert it.agrees


def random_spec(rng: random.Random, depth: int, activation: str) -> dict:
    widths = [rng.randint(1, 4) for _ in range(depth + 1)]
    layers = [{"weights": [[rng.uniform(-1.5, 1.5) for _ in range(n_in)] for _ in range(n_out)],
               "bias": [rng.uniform(-0.5, 0.5) for _ in range(n_out)],
               "activation": activation}
              for n_in, n_out in zip(widths[:-1], widths[1:])]
    return {"layers": layers,
            "input": [rng.uniform(-2, 2) for _ in range(widths[0])],
            "target": [rng.uniform(-1, 1) for _ in range(widths[-1])],
            "learning_rate": 0.05}


# ---------------------------------------------------------------------------------------
# The seed chapter's numbers
# ---------------------------------------------------------------------------------------

def test_seed_forward_loss_and_output_layer_are_the_chapters():
    it = example.run(example.seed_spec()).first
    hidden, out = it.layers
    assert hidden.z == [0.5, 1.5] and hidden.a == [0.5, 1.5]     # Z3, Z4 and a3, a4
    assert out.z == [2.5] and it.output == [2.5]                 # Z5 and Yr
    assert it.loss == 0.25
    assert out.grad_weights[0][0] == 0.5                         # dL/dW53
    assert out.new_weights[0][0] == pytest.approx(0.995, abs=1e-15)   # W53 (new)


def test_seed_hidden_layer_gradients_follow_the_chain_rule():
    # dL/dW31 = dL/dYr · dYr/dZ5 · dZ5/da3 · da3/dZ3 · dZ3/dW31 = 1 · 1 · W53 · 1 · X1
    it = example.run(example.seed_spec()).first
    hidden = it.layers[0]
    assert hidden.grad_weights == [[1.0, 0.0], [1.0, 0.0]]       # W31, W32 / W41, W42
    assert hidden.grad_bias == [1.0, 1.0]                        # b3, b4
    assert hidden.new_weights[0] == pytest.approx([0.49, 0.5], abs=1e-15)   # W31, W32
    assert hidden.new_weights[1] == pytest.approx([0.99, 1.0], abs=1e-15)   # W41, W42
    assert hidden.new_bias == pytest.approx([-0.01, 0.49], abs=1e-15)


def test_ddp_fnn_example_prints_the_seed_worked_example():
    result = CliRunner().invoke(cli, ["example"])
    assert result.exit_code == 0, result.output
    assert_prints_the_seed(result.stdout)


def test_python_m_ddp_fnn_example_prints_it_in_a_real_process():
    proc = run_cli("example", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_prints_the_seed(proc.stdout)
    assert proc.stderr == ""


def test_json_for_the_seed_file_gives_the_same_numbers():
    from_file = CliRunner().invoke(cli, ["example", "--spec", str(SEED_FILE), "--json"])
    built_in = CliRunner().invoke(cli, ["example", "--json"])
    assert from_file.exit_code == 0 and built_in.exit_code == 0, from_file.output + built_in.output
    got = json.loads(from_file.stdout)
    assert got == json.loads(built_in.stdout)
    assert got.keys() == SEED_JSON.keys()
    for key in ("layers", "output", "loss", "gradients"):
        assert got[key] == SEED_JSON[key]
    for layer, expected in zip(got["updated"], SEED_JSON["updated"]):
        assert layer["weights"] == [pytest.approx(r, abs=1e-15) for r in expected["weights"]]
        assert layer["bias"] == pytest.approx(expected["bias"], abs=1e-15)


def test_the_shipped_seed_file_is_the_seed_spec():
    assert json.loads(SEED_FILE.read_text()) == example.SEED_SPEC


def test_the_seed_file_prints_like_the_built_in_seed():
    result = CliRunner().invoke(cli, ["example", "--spec", str(SEED_FILE)])
    assert result.exit_code == 0
    assert result.stdout == CliRunner().invoke(cli, ["example"]).stdout


# ---------------------------------------------------------------------------------------
# The chain rule by hand equals autograd
# ---------------------------------------------------------------------------------------

def test_hand_gradients_equal_autograd_on_the_seed_net():
    assert_hand_equals_autograd(example.seed_spec())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hand_gradients_equal_autograd_on_random_small_nets(depth, activation):
    rng = random.Random(f"{depth}-{activation}")
    for _ in range(5):
        assert_hand_equals_autograd(example.parse_spec(random_spec(rng, depth, activation)))


def test_hand_gradients_equal_autograd_with_mixed_activations():
    rng = random.Random(7)
    for depth in (2, 3, 4):
        raw = random_spec(rng, depth, "relu")
        for layer in raw["layers"]:
            layer["activation"] = rng.choice(sorted(ACTIVATIONS))
        assert_hand_equals_autograd(example.parse_spec(raw))


def test_a_general_net_gets_layer_neuron_names_and_every_gradient_checked(tmp_path):
    spec_file = tmp_path / "net.json"
    spec_file.write_text(json.dumps(random_spec(random.Random(3), 3, "tanh")))
    result = CliRunner().invoke(cli, ["example", "--spec", str(spec_file)])
    assert result.exit_code == 0, result.output
    spec = example.load_spec(spec_file)
    n_params = sum(len(l.bias) * (len(l.weights[0]) + 1) for l in spec.layers)
    assert result.stdout.count("✓ autograd") == n_params
    assert "Z[1,1] = x[1]·W[1,1,1]" in result.stdout
    assert "Where the chapter's text disagrees" not in result.stdout


# ---------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------

def test_steps_reduce_the_loss_on_the_seed_net():
    result = CliRunner().invoke(cli, ["example", "--json", "--steps", "20"])
    assert result.exit_code == 0, result.output
    history = json.loads(result.stdout)["loss_history"]
    assert len(history) == 20 and history[0] == 0.25
    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert history[-1] < 0.01


def test_steps_text_reports_the_loss_of_every_step():
    result = CliRunner().invoke(cli, ["example", "--steps", "3"])
    assert result.exit_code == 0
    assert "step 1: L = 0.25" in result.stdout and "step 3: L = " in result.stdout


def test_json_has_no_loss_history_without_steps():
    assert "loss_history" not in json.loads(CliRunner().invoke(cli, ["example", "--json"]).stdout)


# ---------------------------------------------------------------------------------------
# Bad specs: one line naming the problem and the value, exit status 2
# ---------------------------------------------------------------------------------------

def seed_with(**changes) -> str:
    spec = json.loads(json.dumps(example.SEED_SPEC))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is KeyError:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return json.dumps(spec)


BAD_SPECS = {
    "bad JSON": ('{"layers": [', "not valid JSON"),
    "not an object": ("[1, 2]", "spec must be a JSON object"),
    "missing key": (seed_with(target=KeyError), "missing key 'target'"),
    "unknown key": (seed_with(lr=0.1), "unknown key 'lr'"),
    "layer missing key": (seed_with(layers__1__activation=KeyError), "layers[1]: missing key 'activation'"),
    "no layers": (seed_with(layers=[]), "layers must be a non-empty list"),
    "ragged weights": (seed_with(layers__0__weights=[[0.5, 0.5], [1.0, 1.0, 1.0]]),
                       "layers[0].weights is ragged: row 0 has 2 values, row 1 has 3"),
    "width mismatch between layers": (seed_with(layers__1__weights=[[1.0, 1.0, 1.0]]),
                                      "layers[1].weights rows have 3 values but layers[0] has 2 neurons"),
    "input length": (seed_with(input=[1.0, 0.0, 2.0]),
                     "layers[0].weights rows have 2 values but input has 3: [1.0, 0.0, 2.0]"),
    "target length": (seed_with(target=[2.0, 1.0]), "target has 2 values but the last layer"),
    "bias length": (seed_with(layers__0__bias=[0.0]), "layers[0].bias has 1 values but layers[0].weights has 2"),
    "unknown activation": (seed_with(layers__0__activation="softmax"),
                           'layers[0].activation "softmax" is unknown (choose from relu'),
    "non-numeric weight": (seed_with(layers__0__weights=[[0.5, 0.5], ["x", 1.0]]),
                           'layers[0].weights[1][0] must be a number, got "x"'),
    "boolean input": (seed_with(input=[True, 0.0]), "input[0] must be a number, got true"),
    "NaN bias": ('{"layers": [{"weights": [[1.0]], "bias": [NaN], "activation": "relu"}], '
                 '"input": [1.0], "target": [1.0], "learning_rate": 0.1}',
                 "layers[0].bias[0] must be a finite number, got NaN"),
    "zero learning rate": (seed_with(learning_rate=0), "learning_rate must be a number greater than 0, got 0"),
    "negative learning rate": (seed_with(learning_rate=-0.01), "greater than 0, got -0.01"),
    "string learning rate": (seed_with(learning_rate="fast"), 'greater than 0, got "fast"'),
}


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_is_one_line_naming_the_problem_exit_2(case, tmp_path, capsys):
    text, message = BAD_SPECS[case]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(text)
    code, out, err = run_main(["example", "--spec", str(spec_file)], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"ddp-fnn: error: --spec {spec_file}: ")
    assert message in err
    assert "Traceback" not in err


def test_a_missing_spec_file_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere.json"
    code, _, err = run_main(["example", "--spec", str(missing)], capsys)
    assert code == 2 and err == f"ddp-fnn: error: --spec {missing}: no such file\n"


def test_a_directory_as_spec_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run_main(["example", "--spec", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a directory" in err


def test_a_bad_spec_in_a_real_process_has_no_traceback(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(seed_with(layers__1__activation="softmax"))
    proc = run_cli("example", "--spec", str(spec_file), timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert 'layers[1].activation "softmax" is unknown' in proc.stderr


def test_steps_must_be_positive(capsys):
    code, _, err = run_main(["example", "--steps", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--steps" in err
