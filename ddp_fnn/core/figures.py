"""The figure writer every plot goes through: matplotlib (the `plot` extra) off-screen,
a clear line when it is missing, a PNG written or a ValueError naming what failed.
matplotlib is imported only when a figure is drawn: the core stays importable without it."""

from __future__ import annotations


def check_plotting(no_plot_option: bool = True) -> None:
    """ValueError naming the fix when matplotlib is missing (sweep --plot checks it before
    any job runs); ``no_plot_option``: the command has --no-plot to offer as well."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'ddp-fnn[plot]'"
                         + (" (or pass --no-plot)" if no_plot_option else "")) from None


def pyplot(no_plot_option: bool = True):
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    check_plotting(no_plot_option)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(plt, fig, path, dpi: int, label: str) -> None:
    """Write ``fig`` to ``path`` and close it; ValueError naming ``label`` if it cannot be written."""
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise ValueError(f"{label}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
