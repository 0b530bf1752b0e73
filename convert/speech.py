"""Test scaffolding: real-ish speech synthesised with the Debian ``espeak-ng`` binary.

Random noise never exercises the ranges speech does (silences, formants, loud vowels), so tests that compare
features or codes use these clips. ``espeak-ng`` is deterministic, so the same text gives the same samples.

On a machine without ``espeak-ng`` (an accelerator machine with no package registry), export the sentences
where it is installed and point ``XCODEC2_SPEECH_NPZ`` at the file there::

    python -m convert.speech --export speech.npz          # here: every sentence, 16 kHz, voice "en"
    XCODEC2_SPEECH_NPZ=speech.npz python benchmarks/...   # there: the same samples, no espeak-ng
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ESPEAK_SAMPLING_RATE = 22050

# Fixed sentences of different lengths (roughly 1 s, 2-3 s, 4-5 s and 7 s with the default English voice).
SENTENCES = (
    "Good morning.",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Speech codecs compress audio into a short sequence of discrete tokens, "
    "which a language model can predict one after another.",
)

_GAP_SECONDS = 0.15  # silence between concatenated sentences, like a speaker's pause


def _espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError(
            "espeak-ng is not installed; it synthesises the test speech. Install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu)."
        )
    return binary


def _export_key(text: str, sampling_rate: int, voice: str) -> str:
    return f"{voice}/{sampling_rate}/{SENTENCES.index(text)}"


@functools.lru_cache(maxsize=64)
def _synth_cached(text: str, sampling_rate: int, voice: str) -> np.ndarray:
    exported = os.environ.get("XCODEC2_SPEECH_NPZ")
    if exported and text in SENTENCES:
        with np.load(exported) as samples:
            key = _export_key(text, sampling_rate, voice)
            if key in samples:
                wave = samples[key]
                wave.setflags(write=False)
                return wave
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        result = subprocess.run(
            [_espeak_binary(), "-v", voice, "-w", str(wav_path), text], capture_output=True, text=True
        )
        if result.returncode != 0 or not wav_path.is_file():
            raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {result.stderr.strip()}")
        wave, file_rate = sf.read(wav_path, dtype="float32", always_2d=False)
    if file_rate != sampling_rate:
        wave = soxr.resample(wave, file_rate, sampling_rate, quality="HQ").astype(np.float32)
    wave = np.clip(wave, -1.0, 1.0)
    wave.setflags(write=False)  # cached: callers get copies
    return wave


def synth_speech(text: str, sampling_rate: int = 16000, voice: str = "en") -> np.ndarray:
    """Speak ``text`` with ``espeak-ng``: float32 mono samples in [-1, 1], shape (T,), at ``sampling_rate``."""
    return _synth_cached(text, sampling_rate, voice).copy()


def speech_clip(seconds: float, sampling_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Exactly ``round(seconds * sampling_rate)`` samples of speech, float32 (T,).

    Sentences from ``SENTENCES`` in a ``seed``-dependent order are concatenated with short pauses, repeated as
    needed, and trimmed, so any duration (including lengths that are not multiples of a hop) is available.
    """
    num_samples = round(seconds * sampling_rate)
    if num_samples <= 0:
        raise ValueError(f"seconds must give at least one sample, got {seconds}")
    order = np.random.default_rng(seed).permutation(len(SENTENCES))
    gap = np.zeros(round(_GAP_SECONDS * sampling_rate), dtype=np.float32)
    pieces, total = [], 0
    for index in itertools.cycle(order):
        if total >= num_samples:
            break
        piece = synth_speech(SENTENCES[index], sampling_rate)
        pieces += [piece, gap]
        total += piece.size + gap.size
    return np.concatenate(pieces)[:num_samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export the test sentences for a machine without espeak-ng.")
    parser.add_argument("--export", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--sampling-rate", type=int, default=16000)
    args = parser.parse_args(argv)
    np.savez(args.export, **{_export_key(text, args.sampling_rate, "en"): synth_speech(text, args.sampling_rate)
                             for text in SENTENCES})
    print(f"{len(SENTENCES)} sentences at {args.sampling_rate} Hz -> {args.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
