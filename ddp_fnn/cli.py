"""The `ddp-fnn` command line: one click group, one command per job.

Every user error ends the same way: one line on stderr, ``ddp-fnn: error: ...``,
naming the problem and the value, exit status 2, no traceback.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import click

from ddp_fnn.config import ConfigError, TrainConfig, fields_for_cli


class UserError(click.ClickException):
    """Bad input: printed as one line, exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ddp-fnn")
def cli():
    """Data-parallel training of feed-forward networks, with the network load it makes
    measured per step and exported to Prometheus."""


# ---------------------------------------------------------------------------------------
# train: options generated from TrainConfig's fields (config.py holds the help texts)
# ---------------------------------------------------------------------------------------

def _load_toml_config(ctx: click.Context, _param, path: str | None):
    """--config FILE.toml: its keys are long option names; they become click defaults,
    so the command line and DDP_FNN_* variables still override them."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML: {e}") from None
    known = {name for name, *_ in fields_for_cli()}
    defaults = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"--config {path}: unknown key {key!r} (keys are train's long option names)")
        if name == "layers" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


def _config_options(func):
    """Decorate `func` with one click option per TrainConfig field."""
    for name, type_name, default, meta in reversed(fields_for_cli()):
        flag = "--" + name.replace("_", "-")
        kwargs = dict(help=meta["help"], envvar="DDP_FNN_" + name.upper(), show_default=True)
        if meta.get("flag"):
            kwargs.update(is_flag=True, default=default)
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        elif meta.get("choices"):
            kwargs.update(type=click.Choice(meta["choices"]), default=default)
        elif type_name.startswith("tuple"):
            kwargs.update(type=str, default=",".join(map(str, default)))
        elif type_name.startswith("int"):
            kwargs.update(type=int, default=default)
        elif type_name.startswith("float"):
            kwargs.update(type=float, default=default)
        elif type_name.startswith("Path"):
            kwargs.update(type=click.Path(file_okay=False, path_type=Path), default=default)
        else:
            kwargs.update(type=str, default=default)
        func = click.option(flag, name, **kwargs)(func)
    return func


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), callback=_load_toml_config,
              is_eager=True, expose_value=False, help="TOML file of settings (keys are long option names).")
@_config_options
@click.option("--dry-run", is_flag=True, help="Validate the settings and the data, print the plan, train nothing.")
def train(dry_run: bool, **options):
    """Train the FNN on this worker's shard of every global batch.

    \b
    One process:       ddp-fnn train --max-steps 100
    N processes:       torchrun --standalone --nproc-per-node N -m ddp_fnn train
    Several nodes:     see launch/node.sh (torchrun with c10d rendezvous)
    """
    from ddp_fnn import trainer

    try:
        cfg = TrainConfig(**options)
        code = trainer.main(cfg, dry_run=dry_run)
    except ConfigError as e:
        raise UserError(str(e)) from None
    sys.exit(code)


# ---------------------------------------------------------------------------------------
# example: the seed chapter's worked example (ddp_fnn/example.py)
# ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--spec", "spec_file", metavar="FILE.json", default=None,
              help="A small network to work through, as JSON: layers (weights out x in, bias, "
                   "activation relu|identity|sigmoid|tanh), input, target, learning_rate "
                   "(see docs/worked-example.md). Default: the seed chapter's network.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (per layer z and a, output, loss, gradients, updated "
                   "parameters; first step) instead of the worked text.")
@click.option("--steps", type=click.IntRange(1, 100_000), default=None, metavar="K",
              help="Repeat forward, backward and SGD update K times and report the loss of each "
                   "step (--json adds loss_history).  [default: 1]")
def example(spec_file: str | None, as_json: bool, steps: int | None):
    """Work through one training step by hand, as the seed chapter does: forward pass,
    loss L = Σ(Yr − Ye)², every gradient by the chain rule (each checked against PyTorch
    autograd), and the SGD update.

    \b
    The chapter's network:    ddp-fnn example
    Machine-readable:         ddp-fnn example --json
    Your own small network:   ddp-fnn example --spec net.json --steps 20
    """
    import json

    from ddp_fnn import example as worked

    try:
        spec = worked.seed_spec() if spec_file is None else worked.load_spec(spec_file)
    except worked.SpecError as e:
        raise UserError(f"--spec {spec_file}: {e}") from None
    result = worked.run(spec, steps or 1)
    if as_json:
        click.echo(json.dumps(worked.to_json(result, with_history=steps is not None)))
    else:
        click.echo("\n".join(worked.format_text(result)))
    if not result.agrees:
        # Our hand derivation is wrong somewhere: that is a bug, not a user error.
        click.echo("ddp-fnn: error: hand gradients disagree with autograd", err=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------
# bench and estimate: all-reduce sweep and the cost model (ddp_fnn/bench.py, ddp_fnn/netmodel.py)
# ---------------------------------------------------------------------------------------
# BENCH-ESTIMATE-COMMANDS (replaced by the bench and estimate commands)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group, turning every click error into one line."""
    try:
        cli.main(args=argv, prog_name="ddp-fnn", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ddp-fnn: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"ddp-fnn: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except ConfigError as e:
        click.echo(f"ddp-fnn: error: {e}", err=True)
        sys.exit(2)
