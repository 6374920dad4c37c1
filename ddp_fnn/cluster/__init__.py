"""The launch scripts the package itself runs, shipped as package data so that an
installed wheel's ``ddp-fnn sweep --launcher netns`` finds them:

    netns-cluster.sh   N network-namespace nodes behind a switch, each running node.sh
    node.sh            one node: torchrun with c10d rendezvous, from environment variables
    tbf.sh             the token-bucket (tc tbf) parameters both of them use

A checkout's ``launch/`` holds links to these files, so ``launch/netns-cluster.sh`` and
``launch/node.sh`` are what the docs and the container image run."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def script(name: str) -> Path:
    """The path of one of the shipped scripts (run it with ``bash``: a wheel may not keep
    the executable bit)."""
    path = HERE / name
    if not path.is_file():
        raise FileNotFoundError(f"ddp_fnn/cluster/{name} is missing from this installation")
    return path
