"""ddp-fnn: data-parallel training of feed-forward networks, with the network load it
makes measured per step (phase timing, exposed communication, bytes on the wire) and
exported to Prometheus. See README.md for the launch commands."""

__version__ = "0.1.0"
