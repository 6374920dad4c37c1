"""``--profile A:B``: torch.profiler over optimizer steps A..B, as a Chrome trace.

The profiler is the independent witness for the step records' times (docs/metrics.md):
it sees every operator, every Gloo or NCCL call and, on CUDA, every kernel, where the
Observer sees phases and buckets. Its trace opens in ui.perfetto.dev beside the
timeline (--timeline), which shows the same steps as the Observer saw them.

Each of the Observer's phases is a ``ddp_fnn.<phase>`` range in the trace (record_function),
so operators and kernels can be attributed to the phase they were launched in.

Started before step A's first micro-step and stopped after step B's optimizer step;
``profile-rank{R}.json`` is rewritten as strict JSON (no NaN), as every file this
package writes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ddp_fnn.core import fileio


class StepProfiler:
    def __init__(self, first: int, last: int, path: Path, device: torch.device, observer=None):
        self.first, self.last, self.path = first, last, Path(path)
        self.observer = observer        # its phases become ``ddp_fnn.<phase>`` ranges in the trace
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._prof = None

    def before_step(self, step: int) -> None:
        """Called with the 1-based step about to run."""
        if step == self.first and self._prof is None:
            self._prof = profile(activities=self.activities, record_shapes=False, with_stack=False)
            self._prof.__enter__()
            if self.observer is not None:
                self.observer.annotate = True

    def after_step(self, step: int) -> None:
        """Called with the 1-based step just finished; writes the trace after step B."""
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write (a run that ends inside the window writes what it profiled)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if self.observer is not None:
            self.observer.annotate = False
        prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            trace = json.loads(raw.read_text())
        trace["ddp_fnn"] = {"steps": [self.first, self.last]}
        fileio.write_json(self.path, trace)
