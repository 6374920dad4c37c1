"""The torch-free floor every other part of ddp-fnn stands on: errors (``errors``), rates
and human-readable units (``units``), the byte formulas of collectives (``wire``),
interval arithmetic (``intervals``), atomic files and strict JSON (``fileio``), and the
figure writer (``figures``). Nothing here imports torch or any other ddp_fnn package;
the import contract in pyproject.toml ([tool.importlinter]) holds every floor to that.
"""
