"""Model FLOPs utilisation: achieved model FLOP/s divided by the device's peak.

An FNN's training FLOPs per sample: each Linear layer of a x b weights does a*b
multiply-adds forward (2ab FLOPs), and twice that backward (input and weight
gradients), so 6 * (weights) FLOPs per sample; biases and activations are
negligible and, as in the PaLM paper's MFU, not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by precision.
PEAK_FLOPS = {
    # name fragment: {precision: FLOP/s}
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12},      # SXM
    "A100": {"bf16": 312.0e12, "fp32": 19.5e12},
    "L4": {"bf16": 121.0e12, "fp32": 30.3e12},
}


def train_flops_per_sample(widths: Sequence[int]) -> int:
    return 6 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def peak_flops(device_name: str, precision: str) -> float | None:
    """The table's peak for a device name as torch.cuda.get_device_name() gives it."""
    for fragment, peaks in PEAK_FLOPS.items():       # more specific names come first
        if fragment in device_name:
            return peaks.get(precision)
    return None
