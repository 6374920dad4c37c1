"""Training data: synthetic tasks and files (CSV, Parquet, .npy/.npz), the binary CSV
cache, and the sharding of each global batch across ranks (``datasets.GlobalBatches``)."""
