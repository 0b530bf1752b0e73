"""The one validation of codes handed to the decoder (model API, ``decode_codes`` and the command line)."""

from __future__ import annotations

import numpy as np

from .errors import CodesError


def check_codes(codes, name: str, codebook_size: int | None, ndim: int = 1) -> np.ndarray:
    """Check that ``codes`` is an ``ndim``-D integer array with values in ``[0, codebook_size)``.

    Args:
        codes: any array-like (numpy, jax, a list).
        name: what the codes are called in the error (a file name, ``"codes item 3"``, ``"audio_codes"``).
        codebook_size: the exclusive upper bound of a code; ``None`` checks the dtype and rank only.
        ndim: the expected rank: 1 for one sequence ``(F,)``, 3 for Transformers' ``(B, 1, F)``.

    Returns:
        The codes as an int32 numpy array of the same shape.

    Raises:
        CodesError: naming ``name``, the dtype and shape, or how many codes are out of range and the first.
    """
    array = np.asarray(codes)
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise CodesError(f"{name}: expected a {ndim}-D integer array of codes, got dtype {array.dtype} and shape "
                         f"{array.shape}")
    if codebook_size is not None:
        bad = np.argwhere((array < 0) | (array >= codebook_size))
        if bad.size:
            index = tuple(int(i) for i in bad[0])
            where = index[0] if ndim == 1 else index
            raise CodesError(f"{name}: codes must lie in [0, {codebook_size}); {len(bad)} do not, the first at "
                             f"index {where}: {array[index]}")
    return array.astype(np.int32, copy=False)


__all__ = ["check_codes"]
