"""Hub resolution through a fake offline cache, in a process where torch and transformers cannot be imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xcodec2_jax import CheckpointNotFoundError, Xcodec2Model

REPO_ID = "acme/tiny-xcodec2"

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    sys.modules["transformers"] = None
    import numpy as np
    from xcodec2_jax import CheckpointNotFoundError, Xcodec2FeatureExtractor, Xcodec2Model

    hub_model = Xcodec2Model.from_pretrained(sys.argv[1])   # Transformers checkpoint from the Hub cache
    flax_model = Xcodec2Model.from_pretrained(sys.argv[2])  # our own Flax checkpoint
    wave = (0.3 * np.sin(np.arange(16000) * 0.05) * np.hanning(16000)).astype(np.float32)
    inputs = Xcodec2FeatureExtractor()(wave, sampling_rate=16000)
    a, b = hub_model(**inputs), flax_model(**inputs)
    assert (a.audio_codes == b.audio_codes).all() and np.array_equal(a.audio_values, b.audio_values)
    try:
        Xcodec2Model.from_pretrained("acme/not-in-the-cache")
    except CheckpointNotFoundError as err:
        print("MISSING:", err)
    print("OK", a.audio_codes.shape)
    """
)


def _fake_hub_cache(root: Path, checkpoint: Path) -> Path:
    """The layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def test_hub_offline_and_flax_checkpoint_without_torch(reference, tmp_path):
    cache = _fake_hub_cache(tmp_path / "hub", reference.checkpoint)
    reference.model.save_pretrained(tmp_path / "flax")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, REPO_ID, str(tmp_path / "flax")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (1, 1, 51)" in result.stdout
    assert "MISSING: could not fetch 'acme/not-in-the-cache'" in result.stdout
    assert "Offline? Use a local checkpoint directory" in result.stdout


def test_plain_import_does_not_load_torch():
    code = "import sys, xcodec2_jax; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_paths_raise_clear_errors(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        Xcodec2Model.from_pretrained(tmp_path / "file.bin")
    with pytest.raises(CheckpointNotFoundError, match=r"has no config\.json"):
        (tmp_path / "empty").mkdir()
        Xcodec2Model.from_pretrained(tmp_path / "empty")
