"""Where a step's record goes, and the run's result (summary.json's keys).

``Accounting`` hands every ``observe.StepRecord`` to each consumer: Prometheus
(metrics.py), the namespace's TCP counters read at each
flush (tcpstats.py), the running summary figures (metrics.Summary, which also feed the progress
line), the step file (stepfile.py), the timeline (timeline.py) and MFU on CUDA. The
training loop calls ``add`` once per step and ``flush`` at log intervals (a collective:
the ranks exchange ready times there, peers.py, which completes the held records);
nothing here runs inside a step.
"""

from __future__ import annotations


from ddp_fnn.observe import mfu
from ddp_fnn.observe.prometheus import Summary
from ddp_fnn.observe import StepRecord
from ddp_fnn.observe.control import TRAFFIC


class Accounting:
    def __init__(self, metrics, summary: Summary, steps_file=None, timeline=None,
                 flops_per_sample: float | None = None, peak_flops: float | None = None, witness=None,
                 peers=None, tcp=None):
        self.metrics, self.summary = metrics, summary
        self.peers = peers              # peers.PeerExchange: wait for peers vs transfer
        self._held: list[StepRecord] = []
        self.tcp = tcp                  # tcpstats.TcpCounters: read here, once per log interval
        self.steps_file, self.timeline = steps_file, timeline
        self.witness = witness          # (DdpLoggerWitness, JsonLines) with --ddp-logger
        self.flops_per_sample, self.peak = flops_per_sample, peak_flops

    def add(self, records: list[StepRecord]) -> None:
        """Hold the records until the next exchange of ready times (``flush``)."""
        self._held += records

    def _emit(self, records: list[StepRecord]) -> None:
        for rec in records:
            self.metrics.observe(rec)
            self.summary.add(rec)
            if self.steps_file is not None:
                self.steps_file.add(rec)
            if self.timeline is not None:
                self.timeline.add(rec)
            if self.peak:
                self.metrics.set_mfu(self.flops_per_sample * rec.samples / rec.step_s / self.peak)

    def witness_step(self, step: int) -> None:
        """--ddp-logger: DDP's own figures of the previous step, buffered (a dict read)."""
        if self.witness is not None:
            found = self.witness[0].read(step)
            if found is not None:
                self.witness[1].add_line(found)

    def flush(self) -> None:
        """Collective, at a log interval and at the end: the ranks exchange ready times
        (the held records get wait and transfer), then every consumer gets them, the
        namespace's TCP counters are read (one small file), and the buffered step-file
        lines go to disk."""
        held, self._held = self._held, []
        if self.peers is not None:
            self.peers.exchange(held)
        self._emit(held)
        self.metrics.count_control(TRAFFIC.wire_bytes)
        if self.tcp is not None:
            self.metrics.count_tcp(self.tcp.read())
        for f in (self.steps_file, self.witness[1] if self.witness else None):
            if f is not None:
                f.flush()

    def mfu(self) -> float | None:
        s = self.summary
        if not self.peak or not s.step_s:
            return None
        return self.flops_per_sample * s.samples / sum(s.step_s) / self.peak


def peak_flops(device, precision: str) -> float | None:
    """The device's peak FLOP/s for MFU (CUDA only; None where unknown)."""
    import torch

    return mfu.peak_flops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
