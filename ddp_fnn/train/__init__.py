"""The training service: what every worker runs under torchrun.

``loop`` (the step loop, top to bottom), ``setup`` (group, data, model and synchroniser,
built once), ``model`` (the FNN), ``sync`` (gradient averaging: DDP or one flat
all-reduce, with the observing hooks), ``dist`` (process group, world checks),
``checkpoint`` (save, resume, fingerprint, RNG state).
"""
