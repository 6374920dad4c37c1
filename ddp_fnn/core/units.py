"""Rates and human-readable units: the one parser of link rates, and the formatters
every printed table uses."""

from __future__ import annotations

import math
import re

MIB = 1024 * 1024


# tc(8)'s rate units: bit/s with SI (k=1000) or IEC (ki=1024) prefixes, "bps" = bytes/s.
_RATE_UNITS = {"": 1 / 8, "bit": 1 / 8, "bps": 1.0}
for _p, _m in (("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12),
               ("ki", 2.0 ** 10), ("mi", 2.0 ** 20), ("gi", 2.0 ** 30), ("ti", 2.0 ** 40)):
    _RATE_UNITS[_p + "bit"] = _m / 8
    _RATE_UNITS[_p + "bps"] = _m
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")


RATE_EXAMPLES = "400gbit, 400Gbit/s, 50GB/s, 100mbit or 125mbps"


def parse_rate(text: str) -> float:
    """A link rate to bytes/s: ``400gbit`` -> 5e10, ``100mbit`` -> 1.25e7, the one parser
    of every rate ddp-fnn reads (``--link-rate``, fabric files, sweeps).

    tc(8)'s units, case-insensitive: bit (or none) = bits/s; kbit, mbit, gbit, tbit (x1000
    steps); kibit, mibit, gibit, tibit (x1024 steps); bps = bytes/s, kbps, mbps, gbps, tbps
    (and kibps ...) = bytes/s with those prefixes -- tc's meaning, so ``1gbps`` is 1e9
    bytes/s. Also the ``.../s`` spellings of data sheets, where the case of the b matters
    as it does there: ``450GB/s`` is bytes, ``400Gb/s`` and ``400Gbit/s`` bits. A bad value
    raises ValueError naming it.
    """
    s = str(text).strip()
    if s.endswith("bit/s"):
        s = s[:-2]
    elif s.endswith("B/s"):
        s = s[:-3] + "bps"
    elif s.endswith("b/s"):
        s = s[:-3] + "bit"
    m = _RATE_RE.match(s.lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"bad link rate {text!r}: expected a number and a unit such as {RATE_EXAMPLES}")
    value = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"bad link rate {text!r}: must be a positive finite rate")
    return value


def tc_rate(text: str) -> str:
    """Any rate ``parse_rate`` takes, spelled for tc(8) (whole bits/s): what the namespace
    and container scripts hand to ``tc ... rate``."""
    return f"{round(parse_rate(text) * 8)}bit"


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary prefixes, as DDP's bucket caps are in MiB)."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(t: float) -> str:
    """0.0123 -> '12.3 ms'."""
    if t == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(t) >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


def format_rate(bytes_per_second: float) -> str:
    """5e10 -> '400 Gbit/s (50.0 GB/s)': the link engineer's unit and the byte rate."""
    bits = bytes_per_second * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            head = f"{bits / scale:.3g} {unit}"
            break
    else:
        head = f"{bits:.3g} bit/s"
    return f"{head} ({bytes_per_second / 1e9:.3g} GB/s)"
