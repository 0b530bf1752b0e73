"""Convert a Transformers X-Codec2 checkpoint to this library's Flax checkpoint.

    python convert/convert_checkpoint.py --src HKUSTAudio/xcodec2-hf --out ./xcodec2-flax
    python convert/convert_checkpoint.py --src ./xcodec2-hf --out ./xcodec2-flax

The same as ``xcodec2-jax convert``; this script runs from a checkout without installing the package.
Writes ``config.json``, ``flax_model.safetensors`` and ``preprocessor_config.json`` into ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `xcodec2_jax`

from xcodec2_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
