"""Analysis tools, never on the training path: the network cost model (``netmodel``),
per-job prediction (``predict``), the alpha-beta probe (``probe``), the collective
benchmark (``bench``), sweeps of real jobs (``sweep``) and their plots (``plots``)."""
