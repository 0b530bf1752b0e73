"""How far our outputs are from a reference: the measures the parity report, benchmarks and tests share."""

from __future__ import annotations

import numpy as np


def snr_db(reference, estimate) -> float:
    """Signal-to-difference ratio of ``estimate`` against ``reference`` in dB (same shapes, any float dtype).

    ``10 log10(sum(reference^2) / sum((reference - estimate)^2))`` in float64; ``inf`` when they are equal.
    """
    reference = np.asarray(reference, np.float64)
    noise = np.sum(np.square(reference - np.asarray(estimate, np.float64)))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(np.square(reference)) / noise))


def max_err(got, want) -> float:
    """Largest absolute difference, in float64."""
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
