"""Errors that tell the truth: a user's mistake is one line and exit 1; a bug is a traceback, exit 70, a report line.

In-process through ``cli.main`` (no subprocess start-up, nothing compiled): the model load is the first thing
that fails or is replaced, so no test here runs the codec.
"""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from test_cli import assert_one_line_error

from xcodec2_jax import (
    AudioError,
    CheckpointError,
    CheckpointNotFoundError,
    CodesError,
    ConfigError,
    Xcodec2Error,
    Xcodec2FeatureExtractor,
    Xcodec2Model,
)
from xcodec2_jax.cli import EXIT_BUG, main
from xcodec2_jax.codes import check_codes


@pytest.fixture
def wav(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, np.zeros(3200, np.float32), 16000)
    return path


def _encode(wav, model, tmp_path, *extra) -> int:
    return main(["encode", str(wav), "-o", str(tmp_path / "out"), "--model", str(model), "--no-compile-cache",
                 *extra])


def _copy_checkpoint(reference, tmp_path):
    directory = tmp_path / "checkpoint"
    shutil.copytree(reference.checkpoint, directory)
    return directory


def test_every_user_error_is_an_xcodec2_error_and_keeps_its_builtin_base():
    for error, builtin in ((AudioError, ValueError), (CodesError, ValueError), (ConfigError, ValueError),
                           (CheckpointError, ValueError), (CheckpointNotFoundError, FileNotFoundError)):
        assert issubclass(error, Xcodec2Error) and issubclass(error, builtin)


@pytest.mark.parametrize(
    ("edit", "expected", "error"),
    [
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON", ConfigError),
        (lambda d: (d / "config.json").write_text("[]"), "expected a JSON object of config fields", ConfigError),
        (lambda d: (d / "config.json").write_text(json.dumps({"hidden_act": "tanhshrink"})),
         "hidden_act='tanhshrink' is not supported", ConfigError),
        (lambda d: (d / "config.json").write_text(json.dumps({"hidden_size": "big"})),
         "a config value has the wrong type", ConfigError),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!"),
         "not a safetensors file", CheckpointError),
        (lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors.index.json").write_text("{}")),
         "not a safetensors index", CheckpointError),
        (lambda d: (d / "config.json").unlink(), "has no config.json", CheckpointNotFoundError),
    ],
    ids=["bad-json", "not-an-object", "unsupported-config", "wrong-type", "corrupt-weights", "bad-index", "no-config"],
)
def test_bad_checkpoints_are_user_errors(reference, wav, tmp_path, capsys, edit, expected, error):
    directory = _copy_checkpoint(reference, tmp_path)
    edit(directory)
    with pytest.raises(error, match=expected):
        Xcodec2Model.from_pretrained(directory)
    assert_one_line_error(_encode(wav, directory, tmp_path), capsys.readouterr().err, expected)


def test_bad_preprocessor_config_is_a_config_error(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"padding_side": "left"}')
    with pytest.raises(ConfigError, match="padding_side='left' is not supported"):
        Xcodec2FeatureExtractor.from_pretrained(tmp_path)


def test_extractor_and_model_refuse_a_bad_clip_with_the_same_audio_error(reference):
    """One PCM / mix-down / NaN rule (audio.as_wave) behind the feature extractor and ``encode_audio``."""
    for clip, message in ((np.array([0.0, np.nan] * 400, np.float32), "the audio has 400 NaN or Inf sample"),
                          (np.zeros((800, 2), np.float32), r"has shape \(800, 2\), more channels than samples"),
                          (np.array(["a"] * 800), "has dtype <U1; expected float or integer PCM")):
        with pytest.raises(AudioError, match="audio item 0: " + message) as from_extractor:
            Xcodec2FeatureExtractor()(clip, sampling_rate=16000)
        with pytest.raises(AudioError, match="audio item 0: " + message) as from_model:
            reference.model.encode_audio(clip)
        assert str(from_extractor.value) == str(from_model.value)


def test_code_validation_names_the_first_bad_code():
    assert check_codes([[[1, 2]]], "audio_codes", 4, ndim=3).dtype == np.int32
    with pytest.raises(CodesError, match=r"audio_codes: codes must lie in \[0, 4\); 2 do not, the first at index "
                                         r"\(0, 0, 1\): 4"):
        check_codes(np.array([[[1, 4, 9]]]), "audio_codes", 4, ndim=3)
    with pytest.raises(CodesError, match=r"x\.npy: expected a 1-D integer array of codes, got dtype float32"):
        check_codes(np.zeros(3, np.float32), "x.npy", None)


@pytest.mark.parametrize(("error", "expected"), [
    (PermissionError(errno.EACCES, "Permission denied", "/data/weights"), "/data/weights: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
], ids=["named-file", "disk-full"])
def test_the_system_refusing_a_file_is_a_user_error(reference, wav, tmp_path, capsys, monkeypatch, error, expected):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(Xcodec2Model, "from_pretrained", refuse)
    code = _encode(wav, reference.checkpoint, tmp_path)
    assert_one_line_error(code, capsys.readouterr().err, expected)


@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) not aligned"), KeyError("layers.0"),
                                 OSError("an OSError about no file")], ids=["ValueError", "KeyError", "OSError"])
def test_a_bug_shows_its_traceback_and_asks_for_a_report(reference, wav, tmp_path, capsys, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(Xcodec2Model, "from_pretrained", broken)
    assert _encode(wav, reference.checkpoint, tmp_path) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(bug).__name__}: " in err
    assert "in broken" in err  # the traceback reaches the frame that raised
    last = err.strip().splitlines()[-1]
    assert "internal error" in last and "is a bug in xcodec2-jax" in last and "report it" in last
    assert "error: " + str(bug) not in err  # never dressed up as a user error

    with pytest.raises(type(bug)):  # --debug re-raises it, as it does user errors
        _encode(wav, reference.checkpoint, tmp_path, "--debug")
