"""What every form of the attention core shares (XLA in :mod:`.layers`, :mod:`.attention_cpu`,
:mod:`.attention_pallas`): the logit of a masked key and the index of a relative distance."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)  # as jax.nn.dot_product_attention


def relative_distance(length: int, left: int, right: int) -> jax.Array:
    """(T, T) int: ``clip(r - l, -left, right) + left`` for query l and key r, the row of the relative-key
    table each pair reads."""
    positions = jnp.arange(length)
    return jnp.clip(positions[None, :] - positions[:, None], -left, right) + left
