"""The real X-Codec2 weights against Transformers: ``python -m pytest -m real_weights`` (opt-in).

Runs when the checkpoint is here: ``$XCODEC2_REAL_WEIGHTS`` (a directory holding the Transformers checkpoint)
or ``HKUSTAudio/xcodec2-hf`` in the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``); nothing is downloaded.
Otherwise it skips with a one-line reason. The same report as ``python convert/check_parity.py --model
HKUSTAudio/xcodec2-hf``: the bundled speech and two espeak-ng clips, one padded batch, codes >= 99.9%.

The default run exercises that path on the tiny random checkpoint placed where the real one would be: a fake
Hugging Face cache, offline, in a subprocess running ``pytest -m real_weights`` as a user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.check_parity import (
    REAL_WEIGHTS_ENV,
    find_checkpoint,
    measure_parity,
    parity_clips,
    parity_failures,
    parity_table,
)
from convert.torch_reference import TorchXcodec2Model
from xcodec2_jax import CheckpointNotFoundError, Xcodec2Model
from xcodec2_jax.hub import DEFAULT_REPO_ID

REPO_ROOT = Path(__file__).resolve().parent.parent
# A made-up commit hash: the cache layout only needs refs/main to name the snapshot directory.
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.real_weights
def test_real_weights_match_transformers():
    directory, reason = find_checkpoint()
    if directory is None:
        pytest.skip(reason)
    torch_model = TorchXcodec2Model.from_pretrained(directory, dtype=torch.float32).eval()
    model = Xcodec2Model.from_pretrained(directory)
    rows = measure_parity(torch_model, model, parity_clips())
    print(f"\ncheckpoint: {directory}\n{parity_table(rows)}")
    assert not parity_failures(rows), parity_failures(rows)
    codes = np.concatenate([row.want_codes for row in rows])
    assert len(np.unique(codes)) > 0.25 * codes.size, "speech gave (nearly) constant codes: nothing was compared"


def fake_hub_cache(root: Path, checkpoint: Path, repo_id: str = DEFAULT_REPO_ID) -> Path:
    """A Hugging Face cache at ``root`` holding ``checkpoint`` as ``repo_id``'s main revision; returns the snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / FAKE_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_COMMIT)
    return repo / "snapshots" / FAKE_COMMIT


def test_real_weights_path_runs_on_a_random_checkpoint_in_a_fake_hub_cache(reference, tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hub", reference.checkpoint)
    env = {k: v for k, v in os.environ.items() if k != REAL_WEIGHTS_ENV}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p))
    result = subprocess.run([sys.executable, "-m", "pytest", "-m", "real_weights", "-q", "-s", "-p", "no:cacheprovider",
                             str(Path(__file__))], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
    assert f"checkpoint: {snapshot}\n" in result.stdout  # found in the cache, where the real one would be
    assert "| all (3 clips, one padded batch) |" in result.stdout and "| code match |" in result.stdout


def test_absent_weights_skip_with_a_reason_and_a_bad_directory_fails(reference, tmp_path, monkeypatch):
    monkeypatch.delenv(REAL_WEIGHTS_ENV, raising=False)
    directory, reason = find_checkpoint(cache_dir=tmp_path / "empty-cache")
    assert directory is None
    assert "\n" not in reason and DEFAULT_REPO_ID in reason and REAL_WEIGHTS_ENV in reason

    snapshot = fake_hub_cache(tmp_path / "hub", reference.checkpoint)
    assert find_checkpoint(cache_dir=tmp_path / "hub") == (snapshot, "")
    (snapshot / "model.safetensors").unlink()
    directory, reason = find_checkpoint(cache_dir=tmp_path / "hub")
    assert directory is None and "incomplete" in reason

    monkeypatch.setenv(REAL_WEIGHTS_ENV, str(reference.checkpoint))  # the environment wins over the cache
    assert find_checkpoint(cache_dir=tmp_path / "empty-cache") == (reference.checkpoint, "")
    monkeypatch.setenv(REAL_WEIGHTS_ENV, str(tmp_path / "empty-cache"))  # set, but wrong: an error, not a skip
    with pytest.raises(CheckpointNotFoundError, match="empty-cache"):
        find_checkpoint(cache_dir=tmp_path / "empty-cache")
