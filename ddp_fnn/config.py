"""`train`'s settings: ``TrainConfig``, one frozen dataclass of sections (model, data,
optim, stop, parallel, faults, checkpoint, output, metrics, predict) and the seed. Each
module takes only the sections it uses (data/datasets.py the data and model sections,
train/checkpoint.py the checkpoint section, perfmodel/predict.py the predict section...).

A field is one command-line option: its metadata carries the `--help` text, so the CLI
options are generated from these classes (cli.py), with flat names (``--lr``, not
``--optim-lr``): one home per setting. Validation lives in each section's
``__post_init__`` (and the checks that span sections in ``TrainConfig``'s) and raises
``ConfigError`` whose message names the option, e.g. ``--lr must be a positive number,
got -1.0``.

The checkpoint fingerprint is every field of the sections that change the math
(``MATH_SECTIONS``) and the seed, less the fields marked ``fingerprint=False`` (those
the data's identity already covers, or that change no number the run computes): a new
field in one of those sections is fingerprinted without anyone remembering to list it.

Precedence, as click resolves it: command line > ``DDP_FNN_<OPTION>`` environment
variable > ``--config FILE.toml`` (keys are the long option names) > default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ddp_fnn.core.errors import ConfigError
from ddp_fnn.core.wire import DEFAULT_BUCKET_MB
from ddp_fnn.core.intervals import parse_range


def opt(default, help: str, choices: tuple[str, ...] | None = None, flag: bool = False, file: bool = False,
        single: bool = False, fingerprint: bool = True):
    """A config field with its CLI help (and choices for string enums; ``file`` for a Path
    that names a file, where other Paths name directories; ``single`` for a flag that has
    no --no- twin, such as --no-steps-file; ``fingerprint=False`` for a field of a math
    section that a checkpoint need not match)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "file": file,
                                            "single": single, "fingerprint": fingerprint})


def micro_batch_range(global_batch_size: int, world_size: int, grad_accum: int) -> tuple[int, int]:
    """The smallest and largest per-rank micro-batch, or ConfigError when some rank would
    get no row in some micro-step (the one home of that check: config and GlobalBatches)."""
    div = world_size * grad_accum
    if global_batch_size < div:
        raise ConfigError(f"--global-batch-size {global_batch_size} is smaller than world size x grad-accum = "
                          f"{world_size} x {grad_accum} (every rank needs a row in every micro-step)")
    q, r = divmod(global_batch_size, div)
    return q, q + (r > 0)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


class _Section:
    """A section's shared behaviour: Path fields coerced from strings, a flat dict."""

    def _paths(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))

    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else str(value) if isinstance(value, Path) else value
        return d


def parse_layers(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """"16,64,1", or a sequence of widths (a TOML array, summary.json's "config")."""
    try:
        widths = tuple(int(w) for w in (text if isinstance(text, (tuple, list)) else str(text).split(",")))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers like 16,64,1, got {text!r}") from None
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ConfigError(f"--layers needs at least two positive widths (input,...,output), got {text!r}")
    return widths


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """The network: layer widths and the loss."""
    layers: tuple[int, ...] = opt((32, 256, 256, 1), "Layer widths input,hidden...,output. The input width must "
                                  "match the data's feature count; for classification the output is the class count.")
    task: str = opt("regression", "regression (MSE loss) or classification (cross-entropy).",
                    choices=("regression", "classification"))

    def __post_init__(self):
        object.__setattr__(self, "layers", parse_layers(self.layers))
        _need(self.task != "classification" or self.layers[-1] >= 2,
              f"--layers must end in the class count (>= 2) for classification, got {self.layers[-1]}")


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Where the rows come from and how they are split (data/datasets.py)."""
    data: str = opt("synthetic", "'synthetic' (a seeded random teacher FNN plus noise), or a .csv (header row), "
                    ".parquet, .npz (arrays x and y), .npy features file (targets in the sibling *_y.npy / y.npy), or a "
                    "directory of .npy shards (PART_x.npy with PART_y.npy).", fingerprint=False)
    target: str | None = opt(None, "CSV column holding the target (default: the last column).")
    cache_dir: Path | None = opt(None, "Directory for the binary cache a CSV or Parquet file is converted into "
                                 "once per node (default: .ddp-fnn-cache beside the file).", fingerprint=False)
    samples: int = opt(8192, "Number of synthetic samples.", fingerprint=False)
    noise: float = opt(0.05, "Std of the Gaussian noise added to synthetic regression targets.", fingerprint=False)
    eval_fraction: float = opt(0.2, "Fraction of the data held out for evaluation (seeded split).")
    standardize: bool = opt(False, "Standardise features with the training split's mean and std.", flag=True)

    def __post_init__(self):
        self._paths("cache_dir")
        _need(self.samples >= 2, f"--samples must be at least 2, got {self.samples}")
        _need(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        _need(self.noise >= 0.0, f"--noise must be >= 0, got {self.noise}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """The optimizer step: the global batch, its micro-steps, the update rule, the precision."""
    global_batch_size: int = opt(256, "Samples per optimizer step across the whole job; each rank takes "
                                 "B / (world size x grad-accum) per micro-step.")
    grad_accum: int = opt(1, "Micro-steps per optimizer step; gradients sync only on the last one.")
    optimizer: str = opt("sgd", "Optimizer.", choices=("sgd", "adam"))
    lr: float = opt(0.01, "Learning rate.")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(0.0, "Weight decay (L2), both optimizers.")
    precision: str = opt("fp32", "Compute precision: fp32, or bf16 autocast (on CUDA).", choices=("fp32", "bf16"))

    def __post_init__(self):
        _need(self.global_batch_size >= 1, f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        _need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _need(self.lr > 0.0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        _need(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        _need(self.weight_decay >= 0.0, f"--weight-decay must be >= 0, got {self.weight_decay}")

    def check_world(self, world_size: int) -> tuple[int, int]:
        """The smallest and largest per-rank micro-batch at this world size, or ConfigError.
        Any world size works as long as every rank gets a row in every micro-step; when
        world size x grad-accum does not divide the global batch, the shards differ by one
        row and each micro-batch's loss is weighted by its share (data.GlobalBatches)."""
        return micro_batch_range(self.global_batch_size, world_size, self.grad_accum)


@dataclass(frozen=True, kw_only=True)
class StopConfig(_Section):
    """When training ends. Not part of the checkpoint fingerprint: a larger --max-steps continues
    a finished run."""
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    epochs: int | None = opt(None, "Stop after this many passes over the training split (default 1 when "
                             "--max-steps is not given).")
    target_loss: float | None = opt(None, "Stop when the global mean training loss is <= this, checked at "
                                    "log steps (--log-every) on the mean over the steps since the last one; "
                                    "all ranks stop on the same step.")

    def __post_init__(self):
        _need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        _need(self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig(_Section):
    """Distribution and gradient sync (train/sync.py, ddp_fnn/dist.py)."""
    sync: str = opt("ddp", "ddp: DistributedDataParallel, bucketed and overlapped with backward. allreduce: "
                    "one flat all-reduce after backward (the textbook version).", choices=("ddp", "allreduce"))
    bucket_mb: float = opt(DEFAULT_BUCKET_MB, "DDP bucket cap in MiB (--sync ddp).", fingerprint=False)
    all_reduce: str = opt("flat", "How each DDP bucket is all-reduced. flat: the backend's own all-reduce over "
                          "every rank (Gloo's ring in rank order). hierarchical: reduce-scatter among the "
                          "ranks of each node, all-reduce across nodes among the ranks of the same local rank, "
                          "all-gather inside the node (docs/topology.md, \"Hierarchical on namespaces\").",
                          choices=("flat", "hierarchical"), fingerprint=False)
    compression: str = opt("none", "Gradient compression on the wire (DDP communication hooks).",
                           choices=("none", "fp16", "bf16", "powersgd"))
    powersgd_rank: int = opt(2, "Matrix rank of PowerSGD's low-rank approximation.")
    bucket_detail_every: int = opt(1, "Record each DDP bucket's all-reduce (launch and completion) every K steps; "
                                   "the steps between sync on DDP's C++ path and record step totals only (ready, "
                                   "exposed, wait, transfer), which costs nothing per bucket. CPU and --compression "
                                   "none (on CUDA every step is detailed). docs/metrics.md, \"Bucket detail\".",
                                   fingerprint=False)
    backend: str = opt("auto", "Process-group backend; auto = nccl on CUDA, gloo otherwise.",
                       choices=("auto", "gloo", "nccl"), fingerprint=False)
    device: str = opt("auto", "cpu, cuda, or auto (cuda:LOCAL_RANK when CUDA is available).",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)
    timeout_s: float = opt(300.0, "Collective timeout in seconds: a dead or frozen peer fails the job after this.", fingerprint=False)

    def __post_init__(self):
        _need(self.bucket_mb > 0.0, f"--bucket-mb must be > 0, got {self.bucket_mb}")
        _need(self.powersgd_rank >= 1, f"--powersgd-rank must be >= 1, got {self.powersgd_rank}")
        _need(self.bucket_detail_every >= 1, f"--bucket-detail-every must be >= 1, got {self.bucket_detail_every}")
        _need(self.timeout_s > 0.0, f"--timeout-s must be > 0, got {self.timeout_s}")
        _need(self.compression == "none" or self.sync == "ddp",
              f"--compression {self.compression} needs --sync ddp (it is a DDP communication hook)")
        if self.all_reduce == "hierarchical":
            _need(self.sync == "ddp" and self.compression == "none",
                  f"--all-reduce hierarchical needs --sync ddp and --compression none (got --sync {self.sync}, "
                  f"--compression {self.compression})")
            _need(self.bucket_detail_every == 1,
                  f"--all-reduce hierarchical needs --bucket-detail-every 1 (the steps between would run DDP's "
                  f"flat all-reduce), got {self.bucket_detail_every}")


@dataclass(frozen=True, kw_only=True)
class FaultsConfig(_Section):
    """Injected faults and the policies for real ones (docs/fault-tolerance.md)."""
    slow_rank: int | None = opt(None, "Fault injection for studying stragglers: this rank idles --slow-ms in every "
                                "step's forward, as a slower device would (docs/metrics.md).")
    slow_ms: float = opt(0.0, "Milliseconds rank --slow-rank idles in each step's forward.")
    on_nan: str = opt("stop", "A NaN/Inf in any rank's loss or gradients: stop the job (exit 1), or skip that step "
                      "on every rank (no optimizer step; the step counts).", choices=("stop", "skip"))
    check_replicas_every: int = opt(0, "Steps between checks that every rank holds the same parameters (a hash "
                                    "compared across ranks; a mismatch stops the job). 0 turns it off.")

    def __post_init__(self):
        _need(self.slow_ms >= 0.0 and math.isfinite(self.slow_ms), f"--slow-ms must be >= 0, got {self.slow_ms}")
        _need((self.slow_rank is None) == (self.slow_ms == 0.0),
              f"--slow-rank and --slow-ms go together (got --slow-rank {self.slow_rank}, --slow-ms {self.slow_ms:g})")
        _need(self.slow_rank is None or self.slow_rank >= 0, f"--slow-rank must be >= 0, got {self.slow_rank}")
        _need(self.check_replicas_every >= 0,
              f"--check-replicas-every must be >= 0, got {self.check_replicas_every}")

    def check_world(self, world_size: int) -> None:
        if self.slow_rank is not None and self.slow_rank >= world_size:
            raise ConfigError(f"--slow-rank {self.slow_rank} is not a rank of this job (world size {world_size})")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section):
    """Checkpoints and resume (train/checkpoint.py)."""
    checkpoint_dir: Path | None = opt(None, "Directory where rank 0 writes checkpoints (step-00000120.pt: the whole "
                                      "training state), atomically. With it, a restarted job resumes (--resume auto).")
    checkpoint_every: int | None = opt(None, "Steps between checkpoints (needs --checkpoint-dir; without it, one "
                                       "checkpoint at the end of the run).")
    keep: int = opt(3, "Number of most recent checkpoints kept in --checkpoint-dir.")
    resume: str = opt("auto", "auto: continue from the newest readable checkpoint in --checkpoint-dir, if any; "
                      "never: start afresh; or the path of a checkpoint file.")

    def __post_init__(self):
        self._paths("checkpoint_dir")
        _need(self.checkpoint_every is None or self.checkpoint_dir is not None,
              f"--checkpoint-every {self.checkpoint_every} needs --checkpoint-dir (where to write them)")
        _need(self.checkpoint_every is None or self.checkpoint_every >= 1,
              f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        _need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        _need(self.resume.strip() != "", "--resume must be auto, never or a checkpoint file, got ''")


@dataclass(frozen=True, kw_only=True)
class OutputConfig(_Section):
    """What rank 0 writes and prints, and what every rank records."""
    output: Path | None = opt(None, "Directory where rank 0 writes model.pt and summary.json.")
    steps_file: Path | None = opt(None, "Where this rank writes its step file (one JSON object per optimizer step; "
                                  "{rank} in the name is replaced). Default: DIR/steps-rank{R}.jsonl with "
                                  "--output DIR.", file=True)
    no_steps_file: bool = opt(False, "Write no step file.", flag=True, single=True)
    timeline: str | None = opt(None, "A:B: write DIR/timeline.json (--output DIR; Chrome Trace Event Format, "
                               "opens in ui.perfetto.dev) for optimizer steps A..B of every rank.")
    ddp_logger: bool = opt(False, "Witness: sample PyTorch DDP's own logger every iteration and write its timings "
                           "to DIR/ddp-logger-rank{R}.jsonl beside the step file (--sync ddp, --output DIR).",
                           flag=True)
    profile: str | None = opt(None, "A:B: run torch.profiler over optimizer steps A..B of every rank and write "
                              "its Chrome trace to DIR/profile-rank{R}.json beside the timeline (--output DIR).")
    log_every: int = opt(10, "Steps between progress lines (rank 0) and step-file writes.")
    eval_every: int = opt(0, "Steps between evaluations on the held-out split (0: only at the end).")
    progress: str = opt("auto", "Rank 0's progress: a bar on a terminal, JSON lines otherwise.",
                        choices=("auto", "bar", "json", "none"))

    def __post_init__(self):
        self._paths("output", "steps_file")
        _need(not (self.no_steps_file and self.steps_file is not None),
              f"--no-steps-file and --steps-file {self.steps_file} contradict each other")
        for option, value in (("--timeline", self.timeline), ("--profile", self.profile)):
            if value is not None:
                try:
                    parse_range(value)
                except ValueError as e:
                    raise ConfigError(f"{option} {value}: {e}") from None
                _need(self.output is not None, f"{option} {value} needs --output DIR (where its trace goes)")
        _need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        _need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")

    @property
    def timeline_steps(self) -> tuple[int, int] | None:
        """--timeline A:B as (A, B), or None."""
        return parse_range(self.timeline) if self.timeline is not None else None

    @property
    def profile_steps(self) -> tuple[int, int] | None:
        """--profile A:B as (A, B), or None."""
        return parse_range(self.profile) if self.profile is not None else None

    def steps_file_path(self, rank: int) -> Path | None:
        """This rank's step file, or None when there is none."""
        if self.no_steps_file:
            return None
        if self.steps_file is not None:
            return Path(str(self.steps_file).replace("{rank}", str(rank)))
        return self.output / f"steps-rank{rank}.jsonl" if self.output is not None else None


@dataclass(frozen=True, kw_only=True)
class MetricsConfig(_Section):
    """The Prometheus endpoint and push (observe/prometheus.py)."""
    metrics_port: int = opt(9400, "Base port of the Prometheus /metrics endpoint; each worker serves "
                            "BASE + LOCAL_RANK. 0 turns metrics off.")
    metrics_addr: str = opt("127.0.0.1", "Address the metrics endpoint binds (containers pass 0.0.0.0).")
    metrics_linger: float = opt(0.0, "Seconds to keep /metrics up after the last step, so a scrape gets "
                                "the final figures.")
    pushgateway: str | None = opt(None, "Pushgateway URL (host:port or http://host:port) to push final "
                                  "metrics to at the end.")

    def __post_init__(self):
        _need(0 <= self.metrics_port <= 65535, f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        _need(self.metrics_linger >= 0.0, f"--metrics-linger must be >= 0, got {self.metrics_linger}")


@dataclass(frozen=True, kw_only=True)
class PredictConfig(_Section):
    """The cost model's inputs for this run's prediction (perfmodel/predict.py)."""
    bench_json: Path | None = opt(None, "A `ddp-fnn bench --json` file: its alpha and beta feed the cost model's "
                                  "prediction of this run's communication (summary.json predicted_*).", file=True)
    probe: bool = opt(False, "Predict this run's communication (summary.json predicted_*): without --bench-json, "
                      "time a few all-reduces before the first step to fit alpha and beta (world size >= 2). "
                      "Off by default: a plain run starts its first step at once.", flag=True)
    probe_rounds: int = opt(5, "Timed rounds of the probe, each one all-reduce of every probe size; each size's "
                            "time is the mean of the middle half of its rounds. More rounds cost more time "
                            "before the first step and steady the fit on a noisy host.")

    def __post_init__(self):
        self._paths("bench_json")
        _need(self.probe_rounds >= 1, f"--probe-rounds must be >= 1, got {self.probe_rounds}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every setting of `ddp-fnn train`, by section. ``TrainConfig.of(lr=0.1, ...)`` builds
    one from flat option names, as the command line, DDP_FNN_* and TOML give them."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    seed: int = opt(0, "Seed for init, data generation, split and shuffling. Same seed, same global batches.")

    def __post_init__(self):
        # The checks that span sections.
        out = self.output
        _need(not out.ddp_logger or (self.parallel.sync == "ddp" and out.output is not None),
              "--ddp-logger needs --sync ddp and --output DIR (where ddp-logger-rank{R}.jsonl goes)")
        # The witness reads the observing wrapper's logger, which sees only detailed steps.
        _need(not out.ddp_logger or self.parallel.bucket_detail_every == 1,
              f"--ddp-logger needs --bucket-detail-every 1 (its witness reads every step), got "
              f"{self.parallel.bucket_detail_every}")

    @classmethod
    def of(cls, **flat) -> TrainConfig:
        """A TrainConfig from flat option names (``lr=0.1``); a name no section has is a
        TypeError, as a dataclass's own constructor would raise."""
        unknown = set(flat) - set(SECTION_OF) - {"seed"}
        if unknown:
            raise TypeError(f"TrainConfig has no setting {', '.join(sorted(unknown))}")
        by_section: dict[str, dict] = {}
        for name, value in flat.items():
            if name != "seed":
                by_section.setdefault(SECTION_OF[name], {})[name] = value
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name != "seed"}
        sections = {s: kinds[s](**values) for s, values in by_section.items()}
        return cls(**sections, **({"seed": flat["seed"]} if "seed" in flat else {}))

    def check_world(self, world_size: int) -> tuple[int, int]:
        """The settings checks that need the world size; returns the per-rank micro-batch
        range (OptimConfig.check_world)."""
        self.faults.check_world(world_size)
        return self.optim.check_world(world_size)

    def math_settings(self) -> dict:
        """The settings a checkpoint must match to be resumed: every field of
        ``MATH_SECTIONS`` not marked ``fingerprint=False``, and the seed; flat names."""
        settings = {}
        for name in MATH_SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                if f.metadata.get("fingerprint", True):
                    value = getattr(section, f.name)
                    settings[f.name] = list(value) if isinstance(value, tuple) else value
        settings["seed"] = self.seed
        return settings

    def to_dict(self) -> dict:
        """Flat, as the options are named (summary.json's "config")."""
        d = {}
        for f in dataclasses.fields(self):
            if f.name != "seed":
                d.update(getattr(self, f.name).to_dict())
        d["seed"] = self.seed
        return d


# The sections whose settings change the numbers a run computes (the checkpoint fingerprint).
MATH_SECTIONS = ("model", "data", "optim", "parallel")

SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig) if f.name != "seed"}
# Each flat option name's section: the CLI's flags are flat, the config is not.
SECTION_OF = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
assert len(SECTION_OF) == sum(len(dataclasses.fields(k)) for k in SECTIONS.values()), "a name in two sections"


def math_defaults() -> dict:
    """The fingerprinted settings of a run with every default (``math_settings``): what a
    checkpoint written before a field existed is taken to have had."""
    return TrainConfig().math_settings()


def fields_for_cli():
    """(name, type, default, metadata) of every setting, section by section, for cli.py."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        kinds = [f] if f.name == "seed" else dataclasses.fields(f.default_factory)
        out += [(g.name, g.type, g.default, g.metadata) for g in kinds]
    return out
