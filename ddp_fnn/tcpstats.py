"""TCP's own view of the run: the network namespace's segment counters from /proc/net/snmp.

Gloo runs over TCP, so a packet the fabric drops comes back as a retransmitted segment.
The kernel counts them per network namespace (``Tcp: ... OutSegs RetransSegs``), not per
socket or per process: in a pod or a namespace node the figures are the pod's, on a
shared host they are everything on it, and NCCL over InfiniBand or RoCE (verbs, not
sockets) never shows up here. docs/metrics.md says the same to users.

Read at the start and at each log interval (``report.Accounting.flush``), never per step:
one small file read. Figures are increments since the start of the run; on systems
without the file (not Linux) everything stays ``None`` and no counter moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNMP_PATH = Path("/proc/net/snmp")      # TcpCounters(path=...) reads another (tests)

FIELDS = {"OutSegs": "sent_segments", "RetransSegs": "retransmitted_segments", "InSegs": "received_segments"}


def read_tcp(path: Path | None = None) -> dict[str, int] | None:
    """The ``Tcp:`` counters of /proc/net/snmp as {field: value}, or None where unreadable.

    The file holds, per protocol, a header line of field names and a line of values,
    both starting with the protocol's name."""
    try:
        lines = [ln.split() for ln in Path(path or SNMP_PATH).read_text().splitlines() if ln.startswith("Tcp:")]
    except OSError:
        return None
    if len(lines) < 2 or len(lines[0]) != len(lines[1]):
        return None
    try:
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}
    except ValueError:
        return None


@dataclass
class TcpCounters:
    """Increments of the namespace's TCP counters since construction."""
    path: Path | None = None

    def __post_init__(self):
        self.start = read_tcp(self.path)
        self.last = dict.fromkeys(FIELDS.values(), 0) if self.start is not None else None

    def read(self) -> dict[str, int] | None:
        """{sent_segments, retransmitted_segments, received_segments} since the start
        (never decreasing), or None where /proc/net/snmp was not there at the start."""
        if self.start is None:
            return None
        now = read_tcp(self.path)
        if now is not None:
            for field, name in FIELDS.items():
                if field in now and field in self.start:
                    self.last[name] = max(self.last[name], now[field] - self.start[field])
        return dict(self.last)


def summary_figures(counts: dict[str, int] | None) -> dict:
    """summary.json's per-rank ``tcp`` object: the increments and the retransmitted share."""
    if counts is None:
        return {"sent_segments": None, "retransmitted_segments": None, "received_segments": None,
                "retransmit_ratio": None}
    sent = counts["sent_segments"]
    return {**counts, "retransmit_ratio": counts["retransmitted_segments"] / sent if sent else None}
