"""Rank 0's progress: a bar on a terminal, one JSON line per logging interval otherwise,
and the end-of-run table (print_table, which job.main calls once the prediction is
in). Other ranks get ``Quiet``, so the loop has no rank checks."""

from __future__ import annotations

import sys

from ddp_fnn.core import fileio, units


def make_progress(mode: str, total_steps: int):
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "json"
    return {"bar": Bar, "json": JsonLines, "none": Quiet}[mode](total_steps)


def _rate(summary) -> float:
    return summary.samples * summary.world_size / sum(summary.step_s) if summary.step_s else 0.0


class Quiet:
    def __init__(self, total_steps: int = 0):
        self.total = total_steps

    def update(self, step: int, loss: float, summary) -> None: ...

    def finish(self, result: dict) -> None: ...


class JsonLines(Quiet):
    def update(self, step, loss, summary):
        fig = summary.figures()
        print(fileio.dumps({"step": step, "steps": self.total, "train_loss": loss,
                          "samples_per_second": round(_rate(summary), 1),
                          "step_time_p50_s": fig.get("step_time_p50_s"),
                          "exposed_comm_time_per_step_s": fig.get("exposed_comm_time_per_step_s")}), flush=True)


class Bar(Quiet):
    def update(self, step, loss, summary):
        width = 30
        done = int(width * step / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  "
                         f"loss {loss:.5g}  {_rate(summary):,.0f} samples/s ")
        sys.stderr.flush()

    def finish(self, result):
        sys.stderr.write("\n")


def _fmt(value, unit: str = "") -> str:
    """A figure in the table, through the one set of formatters (core/units.py)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        fmt = {"s": units.format_seconds, "B": units.format_bytes, "B/s": units.format_rate}.get(unit)
        return fmt(value) if fmt is not None else f"{value:.6g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


ROWS = [
    ("world size", "world_size", ""), ("backend / sync", None, ""), ("parameters", "parameters", ""),
    ("steps", "steps", ""), ("samples/s (job)", "samples_per_second", ""),
    ("step time p50", "step_time_p50_s", "s"), ("step time p95", "step_time_p95_s", "s"),
    ("all-reduce calls/step", "allreduce_calls_per_step", ""),
    ("payload/step", "allreduce_payload_bytes_per_step", "B"),
    ("wire bytes/step (rank)", "allreduce_wire_bytes_per_step", "B"),
    ("comm time/step", "comm_time_per_step_s", "s"), ("comm span/step", "comm_span_per_step_s", "s"),
    ("exposed comm/step", "exposed_comm_time_per_step_s", "s"), ("sync tail/step", "sync_tail_per_step_s", "s"),
    ("algbw", "algbw_bytes_per_second", "B/s"), ("busbw", "busbw_bytes_per_second", "B/s"),
    ("predicted comm/step", "predicted_comm_time_per_step_s", "s"),
    ("final train loss", "final_train_loss", ""), ("eval loss", "eval_loss", ""),
    ("eval accuracy", "eval_accuracy", ""),
]


def print_table(result: dict) -> None:
    """The end-of-run summary (rank 0's view), on stdout."""
    lines = []
    for label, key, unit in ROWS:
        if key is None:
            value = f"{result.get('backend')} / {result.get('sync')} ({result.get('compression')})"
        elif key not in result or result[key] is None:
            continue
        else:
            value = _fmt(result[key], unit)
        lines.append(f"  {label:<24} {value}")
    print("summary (rank 0)\n" + "\n".join(lines), file=sys.stderr, flush=True)
