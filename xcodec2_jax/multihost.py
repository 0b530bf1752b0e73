"""Cross-process agreement for multi-host runs (``jax.distributed``): the one place processes exchange values.

Every exchange of values between processes goes through :func:`allgather`, so how a failed or vanished peer
is detected lives here. (The engine needs none: each process runs its own steps on its own devices.)
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils


def allgather(value: np.ndarray) -> np.ndarray:
    """Every process's ``value`` (same shape and dtype everywhere), stacked: (process_count, *value.shape)."""
    return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


__all__ = ["allgather"]
