"""Figures: matplotlib without a display, for every report.

plt = pyplot(); fig, ax = plt.subplots()
"""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, never a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
