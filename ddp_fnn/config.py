"""`train`'s settings: one frozen dataclass, one field per command-line option.

Each field's metadata carries its `--help` text, so the CLI options are generated
from this class (cli.py) and there is one home per setting. Validation lives in
``__post_init__`` and raises ``ConfigError`` whose message names the option, e.g.
``--lr must be a positive number, got -1.0``.

Precedence, as click resolves it: command line > ``DDP_FNN_<OPTION>`` environment
variable > ``--config FILE.toml`` (keys are the long option names) > default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A user's setting is wrong; the message is one line naming the option and value."""


def opt(default, help: str, choices: tuple[str, ...] | None = None, flag: bool = False, file: bool = False,
        single: bool = False):
    """A config field with its CLI help (and choices for string enums; ``file`` for a Path
    that names a file, where other Paths name directories; ``single`` for a flag that has
    no --no- twin, such as --no-steps-file)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "file": file,
                                            "single": single})


def parse_layers(text: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(text, tuple):
        return text
    try:
        widths = tuple(int(w) for w in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers like 16,64,1, got {text!r}") from None
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ConfigError(f"--layers needs at least two positive widths (input,...,output), got {text!r}")
    return widths


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # ---- model and data ---------------------------------------------------------------
    layers: tuple[int, ...] = opt((32, 256, 256, 1), "Layer widths input,hidden...,output. The input width must "
                                  "match the data's feature count; for classification the output is the class count.")
    task: str = opt("regression", "regression (MSE loss) or classification (cross-entropy).",
                    choices=("regression", "classification"))
    data: str = opt("synthetic", "'synthetic' (a seeded random teacher FNN plus noise), or a .csv (header row), "
                    ".parquet, .npz (arrays x and y), .npy features file (targets in the sibling *_y.npy / y.npy), or a "
                    "directory of .npy shards (PART_x.npy with PART_y.npy).")
    target: str | None = opt(None, "CSV column holding the target (default: the last column).")
    cache_dir: Path | None = opt(None, "Directory for the binary cache a CSV or Parquet file is converted into "
                                 "once per node (default: .ddp-fnn-cache beside the file).")
    samples: int = opt(8192, "Number of synthetic samples.")
    noise: float = opt(0.05, "Std of the Gaussian noise added to synthetic regression targets.")
    eval_fraction: float = opt(0.2, "Fraction of the data held out for evaluation (seeded split).")
    standardize: bool = opt(False, "Standardise features with the training split's mean and std.", flag=True)
    seed: int = opt(0, "Seed for init, data generation, split and shuffling. Same seed, same global batches.")
    # ---- optimisation -----------------------------------------------------------------
    global_batch_size: int = opt(256, "Samples per optimizer step across the whole job; each rank takes "
                                 "B / (world size x grad-accum) per micro-step.")
    grad_accum: int = opt(1, "Micro-steps per optimizer step; gradients sync only on the last one.")
    optimizer: str = opt("sgd", "Optimizer.", choices=("sgd", "adam"))
    lr: float = opt(0.01, "Learning rate.")
    momentum: float = opt(0.9, "SGD momentum.")
    weight_decay: float = opt(0.0, "Weight decay (L2), both optimizers.")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    epochs: int | None = opt(None, "Stop after this many passes over the training split (default 1 when "
                             "--max-steps is not given).")
    target_loss: float | None = opt(None, "Stop when the global mean training loss of a step is <= this; "
                                    "all ranks stop on the same step.")
    precision: str = opt("fp32", "Compute precision: fp32, or bf16 autocast (on CUDA).", choices=("fp32", "bf16"))
    # ---- distribution and gradient sync -----------------------------------------------
    sync: str = opt("ddp", "ddp: DistributedDataParallel, bucketed and overlapped with backward. allreduce: "
                    "one flat all-reduce after backward (the textbook version).", choices=("ddp", "allreduce"))
    bucket_mb: float = opt(25.0, "DDP bucket cap in MiB (--sync ddp).")
    compression: str = opt("none", "Gradient compression on the wire (DDP communication hooks).",
                           choices=("none", "fp16", "bf16", "powersgd"))
    powersgd_rank: int = opt(2, "Matrix rank of PowerSGD's low-rank approximation.")
    backend: str = opt("auto", "Process-group backend; auto = nccl on CUDA, gloo otherwise.",
                       choices=("auto", "gloo", "nccl"))
    device: str = opt("auto", "cpu, cuda, or auto (cuda:LOCAL_RANK when CUDA is available).",
                      choices=("auto", "cpu", "cuda"))
    timeout_s: float = opt(300.0, "Collective timeout in seconds: a dead or frozen peer fails the job after this.")
    slow_rank: int | None = opt(None, "Fault injection for studying stragglers: this rank idles --slow-ms in every "
                                "step's forward, as a slower device would (docs/metrics.md).")
    slow_ms: float = opt(0.0, "Milliseconds rank --slow-rank idles in each step's forward.")
    # ---- fault tolerance (checkpoint.py, docs/fault-tolerance.md) ------------------------
    checkpoint_dir: Path | None = opt(None, "Directory where rank 0 writes checkpoints (step-00000120.pt: the whole "
                                      "training state), atomically. With it, a restarted job resumes (--resume auto).")
    checkpoint_every: int | None = opt(None, "Steps between checkpoints (needs --checkpoint-dir; without it, one "
                                       "checkpoint at the end of the run).")
    keep: int = opt(3, "Number of most recent checkpoints kept in --checkpoint-dir.")
    resume: str = opt("auto", "auto: continue from the newest readable checkpoint in --checkpoint-dir, if any; "
                      "never: start afresh; or the path of a checkpoint file.")
    on_nan: str = opt("stop", "A NaN/Inf loss on any rank: stop the job (exit 1), or skip that step on every rank "
                      "(no optimizer step; the step counts).", choices=("stop", "skip"))
    check_replicas_every: int = opt(0, "Steps between checks that every rank holds the same parameters (a hash "
                                    "compared across ranks; a mismatch stops the job). 0 turns it off.")
    # ---- observation and output -------------------------------------------------------
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
    log_every: int = opt(10, "Steps between progress lines (rank 0) and step-file writes.")
    eval_every: int = opt(0, "Steps between evaluations on the held-out split (0: only at the end).")
    bench_json: Path | None = opt(None, "A `ddp-fnn bench --json` file: its alpha and beta feed the cost model's "
                                  "prediction of this run's communication (summary.json predicted_*).", file=True)
    probe: bool = opt(True, "Without --bench-json, time a few all-reduces before training to fit alpha and beta "
                      "for the prediction (world size >= 2).", flag=True)
    probe_rounds: int = opt(5, "Timed rounds of the probe, each one all-reduce of every probe size; each size's "
                            "time is the mean of the middle half of its rounds. More rounds cost more time "
                            "before the first step and steady the fit on a noisy host.")
    progress: str = opt("auto", "Rank 0's progress: a bar on a terminal, JSON lines otherwise.",
                        choices=("auto", "bar", "json", "none"))
    metrics_port: int = opt(9400, "Base port of the Prometheus /metrics endpoint; each worker serves "
                            "BASE + LOCAL_RANK. 0 turns metrics off.")
    metrics_addr: str = opt("127.0.0.1", "Address the metrics endpoint binds (containers pass 0.0.0.0).")
    metrics_linger: float = opt(0.0, "Seconds to keep /metrics up after the last step, so a scrape gets "
                                "the final figures.")
    pushgateway: str | None = opt(None, "Pushgateway URL (host:port or http://host:port) to push final "
                                  "metrics to at the end.")

    def __post_init__(self):
        def need(cond: bool, message: str):
            if not cond:
                raise ConfigError(message)

        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        need(self.samples >= 2, f"--samples must be at least 2, got {self.samples}")
        need(0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        need(self.noise >= 0.0, f"--noise must be >= 0, got {self.noise}")
        need(self.global_batch_size >= 1, f"--global-batch-size must be >= 1, got {self.global_batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0.0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}")
        need(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0.0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.epochs is None or self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.bucket_mb > 0.0, f"--bucket-mb must be > 0, got {self.bucket_mb}")
        need(self.powersgd_rank >= 1, f"--powersgd-rank must be >= 1, got {self.powersgd_rank}")
        need(self.timeout_s > 0.0, f"--timeout-s must be > 0, got {self.timeout_s}")
        if self.steps_file is not None:
            object.__setattr__(self, "steps_file", Path(self.steps_file))
        need(not (self.no_steps_file and self.steps_file is not None),
             f"--no-steps-file and --steps-file {self.steps_file} contradict each other")
        if self.timeline is not None:
            from ddp_fnn.observe.timeline import parse_range
            try:
                parse_range(self.timeline)
            except ValueError as e:
                raise ConfigError(f"--timeline {self.timeline}: {e}") from None
            need(self.output is not None, f"--timeline {self.timeline} needs --output DIR (where timeline.json goes)")
        need(not self.ddp_logger or (self.sync == "ddp" and self.output is not None),
             "--ddp-logger needs --sync ddp and --output DIR (where ddp-logger-rank{R}.jsonl goes)")
        need(self.slow_ms >= 0.0 and math.isfinite(self.slow_ms), f"--slow-ms must be >= 0, got {self.slow_ms}")
        need((self.slow_rank is None) == (self.slow_ms == 0.0),
             f"--slow-rank and --slow-ms go together (got --slow-rank {self.slow_rank}, --slow-ms {self.slow_ms:g})")
        need(self.slow_rank is None or self.slow_rank >= 0, f"--slow-rank must be >= 0, got {self.slow_rank}")
        need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        need(self.probe_rounds >= 1, f"--probe-rounds must be >= 1, got {self.probe_rounds}")
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        if self.bench_json is not None:
            object.__setattr__(self, "bench_json", Path(self.bench_json))
        need(0 <= self.metrics_port <= 65535, f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        need(self.metrics_linger >= 0.0, f"--metrics-linger must be >= 0, got {self.metrics_linger}")
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
        need(self.checkpoint_every is None or self.checkpoint_dir is not None,
             f"--checkpoint-every {self.checkpoint_every} needs --checkpoint-dir (where to write them)")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        need(self.resume.strip() != "", "--resume must be auto, never or a checkpoint file, got ''")
        need(self.check_replicas_every >= 0, f"--check-replicas-every must be >= 0, got {self.check_replicas_every}")
        need(self.compression == "none" or self.sync == "ddp",
             f"--compression {self.compression} needs --sync ddp (it is a DDP communication hook)")
        need(self.task != "classification" or self.layers[-1] >= 2,
             f"--layers must end in the class count (>= 2) for classification, got {self.layers[-1]}")

    def check_world(self, world_size: int) -> tuple[int, int]:
        """The smallest and largest per-rank micro-batch at this world size, or ConfigError.
        Any world size works as long as every rank gets a row in every micro-step; when
        world size x grad-accum does not divide the global batch, the shards differ by one
        row and each micro-batch's loss is weighted by its share (data.GlobalBatches)."""
        if self.slow_rank is not None and self.slow_rank >= world_size:
            raise ConfigError(f"--slow-rank {self.slow_rank} is not a rank of this job (world size {world_size})")
        div = world_size * self.grad_accum
        if self.global_batch_size < div:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is smaller than world size x "
                              f"grad-accum = {world_size} x {self.grad_accum} (every rank needs a row in every "
                              f"micro-step)")
        q, r = divmod(self.global_batch_size, div)
        return q, q + (r > 0)

    @property
    def timeline_steps(self) -> tuple[int, int] | None:
        """--timeline A:B as (A, B), or None."""
        from ddp_fnn.observe.timeline import parse_range
        return parse_range(self.timeline) if self.timeline is not None else None

    def steps_file_path(self, rank: int) -> Path | None:
        """This rank's step file, or None when there is none."""
        if self.no_steps_file:
            return None
        if self.steps_file is not None:
            return Path(str(self.steps_file).replace("{rank}", str(rank)))
        return self.output / f"steps-rank{rank}.jsonl" if self.output is not None else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["output"] = str(self.output) if self.output is not None else None
        d["bench_json"] = str(self.bench_json) if self.bench_json is not None else None
        d["checkpoint_dir"] = str(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        d["steps_file"] = str(self.steps_file) if self.steps_file is not None else None
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir is not None else None
        return d


def fields_for_cli():
    """(name, type, default, metadata) of each TrainConfig field, in order, for cli.py."""
    return [(f.name, f.type, f.default, f.metadata) for f in dataclasses.fields(TrainConfig)]
