"""The `ddp-fnn` command line: one click group, one command per job.

Every user error ends the same way: one line on stderr, ``ddp-fnn: error: ...``,
naming the problem and the value, exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:                               # Python 3.10: the same parser, from PyPI (pyproject.toml)
    import tomli as tomllib

import click

from ddp_fnn.core import wire
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


def _option(name: str, type_name: str, default, meta: dict, flag: str | None = None):
    """The click option of TrainConfig's field ``name``: its help, default, type and choices."""
    flag = flag or "--" + name.replace("_", "-")
    kwargs = dict(help=meta["help"], show_default=True)
    if meta.get("flag"):
        kwargs.update(is_flag=True, default=default)
        if not meta.get("single"):
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
        kind = dict(dir_okay=False) if meta.get("file") else dict(file_okay=False)
        kwargs.update(type=click.Path(path_type=Path, **kind), default=default)
    else:
        kwargs.update(type=str, default=default)
    return flag, kwargs


def _config_options(func):
    """Decorate `func` with one click option per TrainConfig field."""
    for name, type_name, default, meta in reversed(fields_for_cli()):
        flag, kwargs = _option(name, type_name, default, meta)
        func = click.option(flag, name, envvar="DDP_FNN_" + name.upper(), **kwargs)(func)
    return func


_TRAIN_FIELDS = {name: (type_name, default, meta) for name, type_name, default, meta in fields_for_cli()}


def train_option(name: str, *, many: str | None = None, **override):
    """train's option ``name`` on another command (estimate, bench, sweep), from the same
    TrainConfig field: one help text, one default, one list of choices. ``many="dest"``:
    a comma list of such values, a sweep axis, parsed by the command (its default the
    field's). ``override``: click settings that differ here (a default, an envvar)."""
    type_name, default, meta = _TRAIN_FIELDS[name]
    flag, kwargs = _option(name, type_name, default, meta)
    if many is not None:
        choices = meta.get("choices")
        kwargs = dict(type=str, default=str(kwargs["default"]) if not isinstance(default, tuple) else kwargs["default"],
                      show_default=True, metavar=("|".join(choices) if choices else name.split("_")[0].upper()) + ",...",
                      help=f"Comma list, one point each: {meta['help']}")
        if isinstance(default, float):
            kwargs["default"] = f"{default:g}"
    kwargs.update(override)
    return click.option(flag, many or name, **kwargs)


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
    from ddp_fnn import job

    try:
        cfg = TrainConfig.of(**options)
        code = job.main(cfg, dry_run=dry_run)
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
    from ddp_fnn import example as worked
    from ddp_fnn.core import fileio

    try:
        spec = worked.seed_spec() if spec_file is None else worked.load_spec(spec_file)
    except worked.SpecError as e:
        raise UserError(f"--spec {spec_file}: {e}") from None
    result = worked.run(spec, steps or 1)
    if as_json:
        click.echo(fileio.dumps(worked.to_json(result, with_history=steps is not None)))
    else:
        click.echo("\n".join(worked.format_text(result)))
    if not result.agrees:
        # Our hand derivation is wrong somewhere: that is a bug, not a user error.
        click.echo("ddp-fnn: error: hand gradients disagree with autograd", err=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------
# bench and estimate: all-reduce sweep and the cost model (ddp_fnn/perfmodel/bench.py, ddp_fnn/perfmodel/netmodel.py)
# ---------------------------------------------------------------------------------------
@cli.command()
@train_option("layers")
@click.option("--world-size", type=int, default=None,
              help="Number of ranks N (processes, one per GPU or CPU worker).")
@click.option("--link-rate", default=None, metavar="RATE",
              help="Bus bandwidth beta as a link rate: 400gbit, 400Gbit/s, 50GB/s, 100mbit, 125mbps "
                   "(tc's bps = bytes/s). Overrides --bench-json's beta.")
@click.option("--latency-us", type=float, default=None,
              help="alpha: latency of one message step between two ranks, in microseconds; a ring "
                   "all-reduce pays it 2(N-1) times per bucket. Overrides --bench-json's.  [default: 5]")
@click.option("--bench-json", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A `ddp-fnn bench --json` file: alpha and beta fitted to measured all-reduces.")
@click.option("--compute-ms", type=float, default=None,
              help="Compute time of one step on one rank (forward, backward, optimizer; no "
                   "communication), in milliseconds.")
@click.option("--summary", "summary_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A train run's summary.json: compute time = step_time_mean_s - "
                   "exposed_comm_time_per_step_s (seconds), unless --compute-ms is given.")
@click.option("--backward-fraction", type=float, default=2 / 3, show_default="2/3",
              help="Share of the compute time spent in backward, over which the buckets' "
                   "all-reduces can overlap (0..1).")
@train_option("bucket_mb")
@train_option("compression")
@click.option("--algorithm", type=click.Choice(wire.ALGORITHMS),
              default="ring", show_default=True,
              help="All-reduce algorithm; see docs/netmodel.md for each formula. hierarchical "
                   "(reduce-scatter in the server, all-reduce across, all-gather) needs --topology; "
                   "halving-doubling has no --topology mapping.")
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A fabric (TOML or JSON, docs/topology.md; examples in deploy/topologies/): servers x "
                   "GPUs, intra-server, NIC and leaf-spine links. Replaces --world-size, --link-rate, "
                   "--latency-us and --bench-json, and reports bytes per tier and the bottleneck link.")
@click.option("--channels", type=int, default=None,
              help="With --topology: NCCL channels the ring or tree splits the data over  [default: one per NIC].")
@click.option("--sweep", "sweep_spec", default=None, metavar="PARAM=V1,V2,...",
              help="Print a table over one input: world-size=2,8,64,512; link-rate=10gbit,100gbit; "
                   "width=256,1024,4096 (every hidden layer); bucket-mb=1,25,100; compute-ms=5,50.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="With --sweep: draw the table (times in ms, efficiency in %) to a PNG. "
                   "Needs matplotlib: pip install 'ddp-fnn[plot]'.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (bytes, seconds, bytes/s) instead of text.")
def estimate(layers, world_size, link_rate, latency_us, bench_json, compute_ms, summary_file,
             backward_fraction, bucket_mb, compression, algorithm, topology_file, channels, sweep_spec,
             plot_file, as_json):
    """Predict what DDP training puts on the network per step, and what it costs.

    From the layer widths, DDP's buckets, N, the all-reduce algorithm and the network's
    alpha (latency) and beta (bus bandwidth): bytes per rank per step, all-reduce time,
    the part not hidden behind backward (exposed), and scaling efficiency
    compute / (compute + exposed). Formulas and sources: docs/netmodel.md.

    \b
    ddp-fnn estimate --layers 4096,4096,4096,4096,10 --world-size 512 \\
        --link-rate 400gbit --latency-us 5 --compute-ms 12
    ddp-fnn estimate --bench-json bench.json --layers 784,1024,1024,10 --world-size 64 \\
        --compute-ms 8 --sweep world-size=2,8,64,512
    ddp-fnn estimate --topology deploy/topologies/h100-128x8-400g-2to1.toml \\
        --layers 8192,8192,8192,8192,10 --compute-ms 20 --algorithm hierarchical
    """
    from ddp_fnn.perfmodel import estimate as estimator

    try:
        lines = estimator.run(layers=layers, world_size=world_size, link_rate=link_rate, latency_us=latency_us,
                              bench_json=bench_json, compute_ms=compute_ms, summary_file=summary_file,
                              backward_fraction=backward_fraction, bucket_mb=bucket_mb, compression=compression,
                              algorithm=algorithm, topology_file=topology_file, channels=channels,
                              sweep_spec=sweep_spec, plot_file=plot_file, as_json=as_json)
    except ConfigError as e:
        raise UserError(str(e)) from None
    click.echo("\n".join(lines))


@cli.command()
@click.option("--topology", "topology_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Topology file (TOML/JSON, docs/topology.md): the servers, GPUs, NVLink, PCIe and NICs.")
@click.option("--algorithm", type=click.Choice(("auto", "ring", "tree", "nvls", "nvlstree")), default="auto",
              show_default=True, envvar="NCCL_ALGO",
              help="NCCL's algorithm: auto = the tuner's choice per size (as NCCL_ALGO unset).")
@click.option("--protocol", type=click.Choice(("auto", "LL", "LL128", "Simple")), default="auto",
              show_default=True, help="NCCL's protocol: auto = the tuner's choice per size (as NCCL_PROTO unset).")
@click.option("--sizes", default="8:8G", show_default=True,
              help="Bytes per rank: FIRST:LAST doubling (all_reduce_perf -b -e -f 2), or a list 1M,25M,100M.")
@click.option("--compare", "compare_file", type=click.Path(dir_okay=False), default=None,
              help="An all_reduce_perf output: print the model beside each measured row, with the error.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (bytes, microseconds, GB/s) instead of text.")
def busbw(topology_file, algorithm, protocol, sizes, compare_file, as_json):
    """NCCL's all-reduce on a topology, as all_reduce_perf prints it (NCCL backend).

    Per size: time, algbw, busbw, and the algorithm, protocol and channels NCCL's tuner
    would use (its cost model, perfmodel/nccl.py, cited to NCCL's source). Gloo keeps
    the measured alpha-beta model (ddp-fnn bench). docs/nccl.md.

    \b
    ddp-fnn busbw --topology deploy/topologies/h100-2x8-400g.toml --sizes 1M:1G
    ddp-fnn busbw --topology deploy/topologies/dgx-h100.toml --compare all_reduce_perf.txt
    """
    from ddp_fnn.perfmodel import busbw as model

    try:
        lines = model.run(topology_file=topology_file, algorithm=algorithm, protocol=protocol, sizes=sizes,
                          compare_file=compare_file, as_json=as_json)
    except ConfigError as e:
        raise UserError(str(e)) from None
    click.echo("\n".join(lines))


@cli.command()
@click.option("--sizes", default=None, metavar="LO:HI|LIST",
              help="Message sizes in bytes per rank: a range LO:HI doubling (4K:64M), LO:HI:FACTOR, or a "
                   "list 4K,1M,8M; K, M, G are KiB, MiB, GiB.  [default: 4K:256M with NCCL, 4K:32M with Gloo]")
@click.option("--iters", type=int, default=None,
              help="Timed all-reduces per size.  [default: 20 with NCCL, 10 with Gloo]")
@click.option("--warmup", type=int, default=None,
              help="Untimed all-reduces before each size's timed ones.  [default: 5 with NCCL, 2 with Gloo]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default="float32",
              show_default=True, help="Element type of the all-reduced tensor.")
@train_option("backend", envvar="DDP_FNN_BACKEND")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Rank 0 writes the results, the alpha-beta fit and the harness check "
                                   "here (bytes, seconds, bytes/s).")
@click.option("--compare-bare", default="8M", show_default=True, metavar="SIZE",
              help="After the sweep, alternate the harness's timing with a bare all_reduce loop at this "
                   "size (bytes; K, M, G suffixes) and report their busbw ratio; 0 skips it.")
@click.option("--compare-rounds", type=int, default=60, show_default=True,
              help="Rounds of --compare-bare, each 5 harness-timed calls then 5 bare ones.")
@train_option("timeout_s", envvar="DDP_FNN_TIMEOUT_S")
def bench(sizes, iters, warmup, dtype, backend, json_path, compare_bare, compare_rounds, timeout_s):
    """All-reduce bus bandwidth over message sizes, nccl-tests style, and the alpha-beta
    fit `estimate --bench-json` uses.

    \b
    One process (no network):  ddp-fnn bench
    N processes:               torchrun --standalone --nproc-per-node N -m ddp_fnn bench --json bench.json
    Several nodes:             torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d ... -m ddp_fnn bench

    Rank 0 prints per size: bytes, elements, type, time (mean over ranks of each rank's
    median, with the fastest and slowest rank's), algbw = S/t and busbw = algbw x 2(N-1)/N.
    """
    from ddp_fnn.perfmodel import bench as benchmod

    try:
        compare_bytes = benchmod.parse_size(compare_bare)
    except ValueError as e:
        raise UserError(f"--compare-bare: {e}") from None
    try:
        if sizes is not None:
            benchmod.parse_sizes(sizes)
    except ValueError as e:
        raise UserError(f"--sizes: {e}") from None
    try:
        cfg = benchmod.BenchConfig(sizes=sizes, iters=iters, warmup=warmup, dtype=dtype, backend=backend,
                                   json_path=json_path, compare_bare=compare_bytes,
                                   compare_rounds=compare_rounds, timeout_s=timeout_s)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        code = benchmod.main(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    sys.exit(code)


# ---------------------------------------------------------------------------------------
# sweep: a grid of real jobs, measured beside the model
# ---------------------------------------------------------------------------------------

def _sweep_axes(func):
    """One option per axis of the grid (sweep/grid.py AXES); train's own help and default
    where the axis is a train option."""
    from ddp_fnn.sweep.grid import AXES

    for a in reversed(AXES):
        if a.train is not None:
            func = train_option(a.train, many=a.values)(func)
        else:
            func = click.option(a.option, a.values, default=a.default, show_default=True,
                                metavar=a.option[2:].upper().replace("-", "_") + ",...", help=a.help)(func)
    return func


@cli.command(context_settings={"ignore_unknown_options": False})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, metavar="DIR",
              help="Where the points, sweep.csv, sweep.json, validation.md and the plots go. A rerun of the "
                   "same command reuses the points already complete there.")
@click.option("--launcher", type=click.Choice(["netns", "loopback"]), default="netns", show_default=True,
              help="netns: one network-namespace node a worker (launch/netns-cluster.sh, root); loopback: "
                   "torchrun --standalone on this host (no link rates or faults).")
@click.option("--loss-node", type=int, default=1, show_default=True, help="The node whose egress loses packets.")
@train_option("layers", default="256,512,512,512,512,10")
@click.option("--rows-per-rank", type=int, default=32, show_default=True,
              help="Rows of each global batch a rank computes (weak scaling: global batch = nodes x this).")
@click.option("--steps", type=int, default=30, show_default=True, help="Optimizer steps a point.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs of every point.")
@click.option("--calibrate-on", type=int, default=None,
              help="World size whose runs predict the others' (cal_* columns)  [default: the smallest --nodes]")
@click.option("--host-cores", type=int, default=None,
              help="Cores the nodes share, for the calibrated compute scale  [default: this process's CPUs]")
@click.option("--topology", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="The fabric each point runs on and is modelled on link by link (docs/topology.md): its "
                   "gpus_per_server workers a node, servers_per_leaf nodes a leaf with the uplinks at its "
                   "oversubscription of --link-rate (or its uplink_rate); servers = --nodes, nic.rate = "
                   "--link-rate. Adds each NIC's and uplink's kernel bytes beside the model's, and the "
                   "fabric model's step time.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Draw the PNG plots (needs matplotlib).")
@_sweep_axes
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- TRAIN_ARGS...]")
def sweep(out, launcher, loss_node, layers, rows_per_rank, steps, repeat, calibrate_on, host_cores, topology, plot,
          train_args, **axes):
    """Run a grid of real training jobs and put each one's measured step, communication,
    exposed communication, transfer and wait beside the cost model's predictions.

    \b
    ddp-fnn sweep --out sweep/ --nodes 2,3,4 --link-rate unshaped,1gbit,200mbit \\
        --bucket-mb 100,0.25 --compression none,fp16
    ddp-fnn sweep --out fabric/ --nodes 2,4 --link-rate 1gbit --loss 0,0.1,0.5,1,2
    ddp-fnn sweep --out tiers/ --nodes 2,4 --link-rate 100mbit --all-reduce flat,hierarchical \\
        --topology deploy/topologies/netns-2leaf-4x2.toml

    Writes DIR/sweep.csv (one row a point), DIR/sweep.json, DIR/validation.md and PNG
    plots; docs/netmodel.md and docs/fabric.md describe the columns and the plots.
    """
    from ddp_fnn import sweep as sweepmod
    from ddp_fnn.config import parse_layers

    try:
        cfg = sweepmod.SweepConfig(
            out=out, launcher=launcher,
            **{a.values: sweepmod.parse_list(a.option, axes[a.values], a.kind) for a in sweepmod.AXES},
            layers=tuple(parse_layers(layers)), rows_per_rank=rows_per_rank, steps=steps, repeat=repeat,
            loss_node=loss_node, train_args=tuple(train_args), plot=plot, topology=topology)
        cfg.calibrate_on = calibrate_on if calibrate_on is not None else min(cfg.nodes)
        if host_cores is not None:
            cfg.host_cores = host_cores
        if plot:
            from ddp_fnn.core.figures import check_plotting

            check_plotting()
        code = sweepmod.main(cfg)
    except (ValueError, ConfigError) as e:
        raise UserError(str(e)) from None
    sys.exit(code)


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
