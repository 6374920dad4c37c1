"""TCP's own view of the run: the network namespace's segment counters from /proc/net/snmp,
and its retransmission timeouts and tail-loss probes from /proc/net/netstat.

Gloo runs over TCP, so a packet the fabric drops comes back as a retransmitted segment.
Most are repaired within a round trip (fast retransmit after SACKs); the ones that cost a
synchronous all-reduce a whole step are the **timeouts**: a lost retransmission, or a loss
with nothing sent after it, waits for the retransmission timer, at least 200 ms on Linux
(``RtoMin`` in /proc/net/snmp). A tail-loss probe (RFC 8985) is the cheaper repair tried
first, about two round trips after the last send.

The kernel counts per network namespace (``Tcp: ... OutSegs RetransSegs`` and ``TcpExt:
... TCPTimeouts TCPLossProbes``), not per socket or per process: in a pod or a namespace
node the figures are the pod's, on a shared host they are everything on it, and NCCL over
InfiniBand or RoCE (verbs, not sockets) never shows up here. docs/metrics.md says the same
to users.

Read at the start and at each log interval (``report.Accounting.flush``), never per step:
two small file reads. Figures are increments since the start of the run; on systems
without the files (not Linux) everything stays ``None`` and no counter moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNMP_PATH = Path("/proc/net/snmp")        # TcpCounters(path=...) reads others (tests)
NETSTAT_PATH = Path("/proc/net/netstat")

# (file, table, field) -> the name ddp-fnn reports it under
FIELDS = {("snmp", "Tcp", "OutSegs"): "sent_segments",
          ("snmp", "Tcp", "RetransSegs"): "retransmitted_segments",
          ("snmp", "Tcp", "InSegs"): "received_segments",
          ("netstat", "TcpExt", "TCPTimeouts"): "timeouts",
          ("netstat", "TcpExt", "TCPLossProbes"): "loss_probes"}
NAMES = tuple(FIELDS.values())


def read_table(path: Path, table: str) -> dict[str, int] | None:
    """One table of a /proc/net/{snmp,netstat} file as {field: value}, or None where
    unreadable. Each table is a line of field names and a line of values, both starting
    with the table's name and a colon."""
    try:
        lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.startswith(table + ":")]
    except OSError:
        return None
    if len(lines) < 2 or len(lines[0]) != len(lines[1]):
        return None
    try:
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}
    except ValueError:
        return None


def read_tcp(path: Path | None = None) -> dict[str, int] | None:
    """The ``Tcp:`` counters of /proc/net/snmp as {field: value}, or None where unreadable."""
    return read_table(path or SNMP_PATH, "Tcp")


@dataclass
class TcpCounters:
    """Increments of the namespace's TCP counters since construction."""
    path: Path | None = None            # /proc/net/snmp
    netstat_path: Path | None = None    # /proc/net/netstat

    def __post_init__(self):
        self.start = self._now()
        self.last = dict.fromkeys(NAMES, 0) if self.start is not None else None

    def _now(self) -> dict[tuple[str, str, str], int] | None:
        """Every field of FIELDS that can be read now; None without /proc/net/snmp."""
        files = {"snmp": self.path or SNMP_PATH, "netstat": self.netstat_path or NETSTAT_PATH}
        tables = {(f, t): read_table(files[f], t) for f, t in {(f, t) for f, t, _ in FIELDS}}  # each once
        if tables["snmp", "Tcp"] is None:
            return None
        return {(f, t, k): tables[f, t][k] for f, t, k in FIELDS if tables[f, t] and k in tables[f, t]}

    def read(self) -> dict[str, int] | None:
        """{sent_segments, retransmitted_segments, received_segments, timeouts, loss_probes}
        since the start (never decreasing; a field the kernel does not have stays 0), or
        None where /proc/net/snmp was not there at the start."""
        if self.start is None:
            return None
        now = self._now()
        if now is not None:
            for key, name in FIELDS.items():
                if key in now and key in self.start:
                    self.last[name] = max(self.last[name], now[key] - self.start[key])
        return dict(self.last)


def summary_figures(counts: dict[str, int] | None) -> dict:
    """summary.json's per-rank ``tcp`` object: the increments and the retransmitted share."""
    if counts is None:
        return {**dict.fromkeys(NAMES), "retransmit_ratio": None}
    sent = counts["sent_segments"]
    return {**counts, "retransmit_ratio": counts["retransmitted_segments"] / sent if sent else None}
