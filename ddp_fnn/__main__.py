"""`python -m ddp_fnn ...` is `ddp-fnn ...` (torchrun launches workers this way: `torchrun ... -m ddp_fnn train`)."""

from ddp_fnn.cli import main

main()
