"""Honest step timing on CPU and CUDA without serialising the work being measured.

A ``Clock`` hands out marks. On CPU a mark is ``time.perf_counter()`` taken after the
work before it really finished (CPU ops are synchronous, and DDP's backward returns
only after every bucket's all-reduce completed). On CUDA a mark is a recorded CUDA
event: recording is asynchronous, so phases are never synchronised one by one (that
would destroy the compute/communication overlap being measured); the trainer reads a
step's events one step later, when they have long completed.
"""

from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (waits for ``end`` on CUDA, if needed)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start
