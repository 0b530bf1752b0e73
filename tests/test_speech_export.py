"""The exported test sentences stand in for espeak-ng on a machine without it (convert/speech.py)."""

import numpy as np
import pytest

from convert import speech


@pytest.fixture
def fresh_synthesis_cache():
    speech._synth_cached.cache_clear()
    yield
    speech._synth_cached.cache_clear()


def test_exported_sentences_give_the_same_clips_without_espeak(tmp_path, monkeypatch, fresh_synthesis_cache):
    expected = speech.speech_clip(3.3, seed=5)
    exported = tmp_path / "speech.npz"
    assert speech.main(["--export", str(exported)]) == 0
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on the PATH from here on
    speech._synth_cached.cache_clear()

    monkeypatch.setenv("XCODEC2_SPEECH_NPZ", str(exported))
    np.testing.assert_array_equal(speech.speech_clip(3.3, seed=5), expected)

    monkeypatch.delenv("XCODEC2_SPEECH_NPZ")
    speech._synth_cached.cache_clear()
    with pytest.raises(RuntimeError, match="espeak-ng is not installed"):
        speech.speech_clip(1.0)
