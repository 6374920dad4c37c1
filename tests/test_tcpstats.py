"""ddp_fnn/observe/tcpstats.py: the namespace's TCP counters from /proc/net/snmp, and their export.

Hand-made snmp files stand in for the kernel's where exact figures are needed; one test
reads the real file around a real loopback TCP transfer, as an independent witness that
the fields read are the ones the kernel counts.
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ddp_fnn.observe import tcpstats
from ddp_fnn.observe.prometheus import Metrics, Summary
from ddp_fnn.observe.accounting import Accounting

RUN_INFO = {"backend": "gloo", "sync": "ddp", "compression": "none", "layers": "4,1", "device": "cpu"}

# The layout of Linux's /proc/net/snmp (abridged to Ip, Tcp and Udp): per protocol, a line
# of field names and a line of values.
SNMP = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors
Ip: 1 64 {ip} 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 10 9 0 0 4 {ins} {outs} {retrans} 0 3 0
Udp: InDatagrams NoPorts InErrors OutDatagrams
Udp: 5 0 0 5
"""


# The layout of /proc/net/netstat (abridged): the TcpExt table, then IpExt, whose last
# field has the same name as nothing in TcpExt (a reader must not mix the tables).
NETSTAT = """\
TcpExt: SyncookiesSent EmbryonicRsts TCPLossProbes TCPLossProbeRecovery TCPTimeouts TCPSpuriousRTOs
TcpExt: 0 0 {probes} 1 {timeouts} 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def write_snmp(path: Path, ins: int, outs: int, retrans: int, timeouts: int = 0, probes: int = 0) -> None:
    """/proc/net/snmp's Tcp figures at ``path``, and netstat's TcpExt beside it (path.netstat)."""
    path.write_text(SNMP.format(ip=ins + 7, ins=ins, outs=outs, retrans=retrans))
    netstat_of(path).write_text(NETSTAT.format(timeouts=timeouts, probes=probes))


def netstat_of(snmp: Path) -> Path:
    return snmp.with_suffix(".netstat")


def counters_of(snmp: Path) -> tcpstats.TcpCounters:
    return tcpstats.TcpCounters(snmp, netstat_of(snmp))


def test_read_tcp_takes_the_tcp_lines_by_field_name(tmp_path):
    snmp = tmp_path / "snmp"
    write_snmp(snmp, ins=1000, outs=2000, retrans=17)
    tcp = tcpstats.read_tcp(snmp)
    assert (tcp["InSegs"], tcp["OutSegs"], tcp["RetransSegs"]) == (1000, 2000, 17)
    assert tcp["RtoMin"] == 200


def test_missing_or_garbled_file_reads_as_none(tmp_path):
    assert tcpstats.read_tcp(tmp_path / "absent") is None
    (tmp_path / "bad").write_text("Tcp: InSegs OutSegs\nTcp: 1\n")
    assert tcpstats.read_tcp(tmp_path / "bad") is None
    counters = counters_of(tmp_path / "absent")
    assert counters.read() is None
    assert tcpstats.summary_figures(None)["retransmitted_segments"] is None


def test_counters_are_increments_since_the_start(tmp_path):
    snmp = tmp_path / "snmp"
    write_snmp(snmp, ins=1000, outs=2000, retrans=17)
    counters = counters_of(snmp)
    assert counters.read() == {"sent_segments": 0, "retransmitted_segments": 0, "received_segments": 0,
                               "timeouts": 0, "loss_probes": 0}
    write_snmp(snmp, ins=1500, outs=2800, retrans=29, timeouts=3, probes=8)
    assert counters.read() == {"sent_segments": 800, "retransmitted_segments": 12, "received_segments": 500,
                               "timeouts": 3, "loss_probes": 8}
    # A file that vanishes for a moment keeps the last figures; counters never go back.
    snmp.unlink()
    assert counters.read()["retransmitted_segments"] == 12
    write_snmp(snmp, ins=1500, outs=2900, retrans=30)
    figures = tcpstats.summary_figures(counters.read())
    assert figures["sent_segments"] == 900 and figures["retransmitted_segments"] == 13
    assert figures["retransmit_ratio"] == pytest.approx(13 / 900)


def test_flush_exports_what_is_new_as_prometheus_counters(tmp_path):
    """Accounting.flush (the log interval) reads the file; the counters follow it."""
    snmp = tmp_path / "snmp"
    write_snmp(snmp, ins=10, outs=100, retrans=5)
    reg = CollectorRegistry()
    metrics = Metrics(0, 2, RUN_INFO, registry=reg)
    acct = Accounting(metrics, Summary(2), tcp=counters_of(snmp))

    def value(name):
        return reg.get_sample_value(name, {"rank": "0"})

    assert value("ddp_fnn_tcp_sent_segments_total") == 0          # exists from the first scrape
    assert value("ddp_fnn_tcp_retransmitted_segments_total") == 0
    assert value("ddp_fnn_tcp_timeouts_total") == 0
    write_snmp(snmp, ins=60, outs=400, retrans=9, timeouts=2, probes=5)
    acct.flush()
    assert value("ddp_fnn_tcp_sent_segments_total") == 300
    assert value("ddp_fnn_tcp_retransmitted_segments_total") == 4
    assert (value("ddp_fnn_tcp_timeouts_total"), value("ddp_fnn_tcp_loss_probes_total")) == (2, 5)
    write_snmp(snmp, ins=70, outs=450, retrans=9, timeouts=2, probes=5)
    acct.flush()
    assert value("ddp_fnn_tcp_sent_segments_total") == 350
    assert value("ddp_fnn_tcp_retransmitted_segments_total") == 4
    assert value("ddp_fnn_tcp_timeouts_total") == 2


def test_a_kernel_without_netstat_still_counts_segments(tmp_path):
    """/proc/net/netstat missing (or without TCPTimeouts): segments are counted, the
    timeouts stay at 0 rather than failing the run."""
    snmp = tmp_path / "snmp"
    write_snmp(snmp, ins=10, outs=100, retrans=5)
    netstat_of(snmp).unlink()
    counters = counters_of(snmp)
    write_snmp(snmp, ins=20, outs=150, retrans=6, timeouts=4)
    netstat_of(snmp).unlink()
    assert counters.read() == {"sent_segments": 50, "retransmitted_segments": 1, "received_segments": 10,
                               "timeouts": 0, "loss_probes": 0}


@pytest.mark.skipif(not Path("/proc/net/snmp").exists(), reason="needs Linux's /proc/net/snmp")
def test_a_real_transfer_moves_the_real_out_segments():
    """1 MB over loopback TCP is at least 1 MB / 65,483 B (loopback's MTU less headers)
    segments: OutSegs of this namespace rises by at least that many."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    counters = tcpstats.TcpCounters()
    server = socket.create_server(("127.0.0.1", 0))
    received = []

    def sink():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 16):
                received.append(len(chunk))

    t = threading.Thread(target=sink)
    t.start()
    with socket.create_connection(server.getsockname()) as c:
        c.sendall(b"x" * 1_000_000)
    t.join(timeout=10)
    server.close()
    assert sum(received) == 1_000_000
    sent = counters.read()["sent_segments"]
    assert sent >= 1_000_000 // 65_483, sent
