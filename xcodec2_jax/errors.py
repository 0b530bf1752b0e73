"""The errors that mean "what you gave cannot be used": bad audio, codes, config or checkpoint, no checkpoint.

Every one derives from :class:`Xcodec2Error`, so a caller (the command line first of all) can tell a user's
mistake, reported in one line, from a bug in this library, which must surface with its traceback. Each also
derives from the built-in error it refines (``ValueError``, ``FileNotFoundError``), so existing ``except``
clauses keep working. Raise these only for problems with the caller's inputs; a failed internal invariant
stays a plain exception.
"""

from __future__ import annotations


class Xcodec2Error(Exception):
    """Base of the errors caused by the caller's inputs rather than by a bug in xcodec2-jax."""


class AudioError(Xcodec2Error, ValueError):
    """Audio that cannot be used: missing, unreadable, empty, too short, not numeric, or with NaN/Inf samples."""


class CodesError(Xcodec2Error, ValueError):
    """Codes that cannot be decoded: not an integer array of the expected rank, or outside the codebook."""


class ConfigError(Xcodec2Error, ValueError):
    """A configuration that is invalid or that this port does not support."""


class CheckpointError(Xcodec2Error, ValueError):
    """A checkpoint that does not fit the model or cannot be read; the message names every offending key."""


class CheckpointNotFoundError(Xcodec2Error, FileNotFoundError):
    """No usable checkpoint at the given path or repo id (including an unreachable Hub)."""


__all__ = ["AudioError", "CheckpointError", "CheckpointNotFoundError", "CodesError", "ConfigError", "Xcodec2Error"]
