"""Measurement, in one place: the clock, phase marks, collective records, and the turning
of one step's marks into a ``StepRecord``.

Everything that reports a time (Prometheus metrics, summary.json, the progress line, the
step file, the timeline) consumes ``StepRecord``s and computes no duration of its own.

The loop marks phases; the gradient hooks mark collectives::

    obs.begin_step(step)
    with obs.phase("data"): ...
    with obs.phase("forward"): ...
    with obs.phase("backward"): ...          # DDP's buckets are launched and completed in here
    with obs.phase("sync"): ...              # --sync allreduce: the flat all-reduce
    with obs.phase("optimizer"): ...
    obs.end_step(samples, loss)
    for rec in obs.finished(): ...           # at log steps: every step closed since the last

Clocks. On CPU a mark is ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, one clock for
every process of a host, network namespaces included), taken after the work before it
really finished (CPU ops are synchronous, and DDP's backward returns only after every
bucket's all-reduce completed). On CUDA a mark is a recorded CUDA event: recording is
asynchronous, so phases are never synchronised one by one (that would destroy the
compute/communication overlap being measured); the steps' events are read at log steps
(``finished``), so between them the host runs ahead of its GPU as under plain DDP and
the records lag by up to ``--log-every`` steps. The step's loss goes to host memory
without waiting and is read behind the step's last mark. (``emulated.EmulatedStream``
makes both rules checkable on CPU.)

Definitions (docs/metrics.md has them with a worked example), per step and per rank,
as offsets in seconds from the step's start:

* ``ready``: when this rank's own gradients were all handed over to the backend, i.e.
  the launch of the step's last collective (DDP: the last bucket's hook call, which
  happens when autograd produced the last gradient; flat mode: the one all-reduce).
* comm time: the length of the union of the collectives' [launch, completion] intervals.
* comm span: first launch to last completion (gaps between buckets included).
* exposed communication: the part of the comm time after ``ready``; never more than
  comm time.
* sync tail: the rest of the wait between the end of gradient compute and the
  gradients being usable, that is not communication: DDP's finalize (copying reduced
  buckets back, the autograd engine's last callbacks) or the flat mode's flatten and
  copy-back.
* backward: gradient compute only (DDP: up to ``ready``).
"""

# The public surface of measurement; each name has one home in a submodule.
from ddp_fnn.observe.clock import PHASES, Clock, Stopwatch, now, wall  # noqa: F401
from ddp_fnn.observe.records import (CollectiveRecord, StepRecord, cristian, done_time,  # noqa: F401
                                     make_record, ready_time, split_wait)
from ddp_fnn.observe.observer import DdpLoggerWitness, Observer  # noqa: F401
