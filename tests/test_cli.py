"""The ``xcodec2-jax`` command line, run as users run it: a subprocess, offline, on a local checkpoint.

Each subprocess pays Python + JAX start-up (and a compilation-cache load), so the successful commands run
once each and every output is checked from that run; the error cases run concurrently. Parser-level
behaviour (help, usage errors, the tokenize contract) is checked in-process through ``main``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors import safe_open

from convert.speech import speech_clip
from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.cli import build_parser, engine_settings, main
from xcodec2_jax.engine import EngineSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
# `--batch-size 2` with the default buckets, as the commands below run; every clip is under 2 s, so all use
# the 2 s bucket: one encode and one decode compilation, shared with tests/test_encode_audio.py.
# Both clips are under 2 s: one 2 s bucket, one encode and one decode compilation.
SETTINGS = EngineSettings(batch_size=2, bucket_seconds=(2.0,))
MODEL_OPTIONS = ("--batch-size", "2", "--buckets", "2")
ERROR_PREFIX = "xcodec2-jax: error: "
PCM16_TOL = 2 / 32768  # one 16-bit step, plus rounding


def _env(**extra: str) -> dict[str, str]:
    """Offline, with the checkout importable (the package need not be installed)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def _command(*args, script: Path | None = None) -> list[str]:
    entry = [str(script)] if script else ["-m", "xcodec2_jax.cli"]
    return [sys.executable, *entry, *map(str, args)]


def run_cli(*args, cwd: Path, script: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run the command line (or ``script``) in a subprocess; returns the finished process, text output."""
    return subprocess.run(_command(*args, script=script), cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=900)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(returncode: int, stderr: str, expected: str, exit_code: int = 1) -> None:
    """Exit ``exit_code`` and exactly one stderr line: the error prefix and a message containing ``expected``."""
    lines = stderr.strip().splitlines()
    assert returncode == exit_code, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), stderr
    assert expected in lines[0], stderr


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[Path]:
    """Two speech files: 1.3 s at 16 kHz, and 1.7 s at 22.05 kHz (resampled when read)."""
    root = tmp_path_factory.mktemp("cli-wavs")
    files = [root / "first.wav", root / "second.wav"]
    sf.write(files[0], speech_clip(1.3, seed=0), 16000, subtype="PCM_16")
    sf.write(files[1], speech_clip(1.7, sampling_rate=22050, seed=1), 22050, subtype="PCM_16")
    return files


# ----------------------------------------------------------------------------------------- subprocesses
def test_encode_decode_roundtrip(reference, wavs, tmp_path):
    want_codes = reference.model.encode_audio(wavs, settings=SETTINGS)
    want_audio = reference.model.decode_codes(want_codes, settings=SETTINGS)
    model = ("--model", reference.checkpoint, *MODEL_OPTIONS)

    encoded = run_cli("encode", *wavs, "-o", tmp_path / "codes", *model, cwd=tmp_path)
    assert_ok(encoded)
    assert "encode: 100%" in encoded.stderr  # two files: a progress bar
    code_files = [tmp_path / "codes" / f"{wav.stem}.npy" for wav in wavs]
    for wav, path, want in zip(wavs, code_files, want_codes, strict=True):
        codes = np.load(path)
        assert codes.dtype == np.int32 and codes.ndim == 1
        np.testing.assert_array_equal(codes, want)
        assert f"{wav} -> {path}: {want.size} codes" in encoded.stdout

    decoded = run_cli("decode", *code_files, "-o", tmp_path / "audio", "--no-progress", *model, cwd=tmp_path)
    assert_ok(decoded)
    assert "decode:" not in decoded.stderr  # --no-progress
    for path, codes, want in zip(code_files, want_codes, want_audio, strict=True):
        info = sf.info(tmp_path / "audio" / f"{path.stem}.wav")
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        audio, _ = sf.read(tmp_path / "audio" / f"{path.stem}.wav", dtype="float32")
        assert audio.shape == (codes.size * 320,)
        assert np.abs(audio - np.clip(want, -1, 1)).max() <= PCM16_TOL
        assert np.abs(audio).max() > 1e-3

    roundtrip = run_cli("roundtrip", wavs[0], "-o", tmp_path / "rt.wav", *model, cwd=tmp_path)
    assert_ok(roundtrip)
    codes = want_codes[0]
    assert f"1.30 s -> {codes.size} codes" in roundtrip.stdout
    assert f"rt.wav: {codes.size * 320 / 16000:.2f} s at 16000 Hz" in roundtrip.stdout
    audio, rate = sf.read(tmp_path / "rt.wav", dtype="float32")
    assert rate == 16000 and audio.shape == (codes.size * 320,)
    assert np.abs(audio - np.clip(want_audio[0], -1, 1)).max() <= PCM16_TOL


def test_convert_writes_a_flax_checkpoint_that_encodes_the_same(reference, wavs, tmp_path):
    # Through the standalone script (no PYTHONPATH: it must find the checkout itself), which runs `convert`.
    out = tmp_path / "flax"
    script = REPO_ROOT / "convert" / "convert_checkpoint.py"
    result = run_cli("--src", reference.checkpoint, "--out", out, cwd=tmp_path, script=script, PYTHONPATH="")
    assert_ok(result)

    weights = out / "flax_model.safetensors"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "flax_model.safetensors",
                                                     "preprocessor_config.json"]
    with safe_open(str(weights), framework="numpy") as f:
        count = sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())  # noqa: SIM118
    assert f"parameters: {count:,}" in result.stdout
    assert f"{weights} (" in result.stdout
    converted = Xcodec2Model.from_pretrained(out)
    assert converted.config == reference.model.config
    assert Xcodec2FeatureExtractor.from_pretrained(out).to_dict() == Xcodec2FeatureExtractor().to_dict()
    for got, want in zip(converted.encode_audio(wavs, settings=SETTINGS),
                         reference.model.encode_audio(wavs, settings=SETTINGS), strict=True):
        np.testing.assert_array_equal(got, want)


def test_user_errors_exit_1_with_one_line_and_no_traceback(reference, wavs, tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 64)
    np.save(tmp_path / "float.npy", np.zeros(8, np.float32))
    np.save(tmp_path / "range.npy", np.array([3, 65536, 7]))
    model = ("--model", reference.checkpoint, "-o", tmp_path / "out")
    cases = {  # arguments -> what the message must say
        ("encode", tmp_path / "missing.wav", *model): "missing.wav: no such file",
        ("encode", tmp_path / "corrupt.wav", *model): "corrupt.wav: cannot read the audio, the file is corrupt",
        ("decode", tmp_path / "float.npy", *model): "float.npy: expected a 1-D integer array of codes",
        ("decode", tmp_path / "range.npy", *model): "range.npy: codes must lie in [0, 65536); 1 do not, the "
                                                    "first at index 1: 65536",
        ("encode", wavs[0], "-o", tmp_path / "out", "--model", tmp_path / "no-such-checkpoint"):
            "is neither an existing directory nor a valid Hub repo id",
        ("encode", wavs[0], "-o", tmp_path / "out", "--model", "acme/not-in-the-cache"):
            "could not fetch 'acme/not-in-the-cache' from the Hugging Face Hub",
    }
    # Concurrently: each process mostly waits on start-up, and none of them compiles anything.
    env = _env(HF_HUB_CACHE=str(tmp_path / "empty-hub-cache"))
    processes = {args: subprocess.Popen(_command(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True) for args in cases}
    for args, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert_one_line_error(process.returncode, stderr, cases[args])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------- in-process
def _help(argv: list[str], capsys) -> str:
    """The help text ``main(argv)`` prints, after checking that it exits with status 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["encode", "decode", "roundtrip", "convert", "export"])
def test_subcommand_help(command, capsys):
    out = _help([command, "--help"], capsys)
    assert out.startswith(f"usage: xcodec2-jax {command}") and "examples:" in out and "--debug" in out
    assert ("--model" in out) == (command not in ("convert", "export"))


@pytest.mark.parametrize("command", ["tokenize", "detokenize"])
def test_tokenize_subcommand_help(command, capsys):
    out = _help([command, "--help"], capsys)
    assert out.startswith(f"usage: xcodec2-jax {command}") and "--model" in out and "--batch-size" in out


def test_main_help_lists_the_commands(capsys):
    out = _help(["--help"], capsys)
    assert all(command in out for command in ("encode", "decode", "roundtrip", "convert", "export"))


def test_usage_errors_exit_2_before_loading_anything(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "file").write_text("")
    cases = {
        ("encode", tmp_path / "a" / "x.wav", tmp_path / "b" / "X.flac", "-o", tmp_path / "out"):
            "would both be written to",
        ("encode", tmp_path / "a" / "x.wav", "-o", tmp_path / "file"): "exists and is not a directory",
        ("roundtrip", tmp_path / "a" / "x.wav", "-o", tmp_path / "a"): "is a directory; -o expects",
        ("convert", "--src", tmp_path / "a", "--out", tmp_path / "a"): "is the source checkpoint itself",
    }
    for args, expected in cases.items():
        code = main([str(a) for a in args])
        assert_one_line_error(code, capsys.readouterr().err, expected, exit_code=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "x.wav", "-o", "out", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
    for bad in ("0", "inf", "nan", "six"):
        with pytest.raises(SystemExit) as exit_info:
            main(["encode", "x.wav", "-o", "out", "--full-batch-seconds", bad])
        assert exit_info.value.code == 2
        assert f"must be a finite number of seconds > 0 or 'none', got '{bad}'" in capsys.readouterr().err


def test_full_batch_seconds_reaches_the_engine_settings():
    parse = build_parser().parse_args
    assert engine_settings(parse(["encode", "x.wav", "-o", "o"])).full_batch_seconds == 6.0
    assert engine_settings(parse(["encode", "x.wav", "-o", "o", "--full-batch-seconds", "None"])).full_batch_seconds \
        is None
    assert parse(["tokenize", "a.tar", "-o", "o", "--full-batch-seconds", "12.5"]).full_batch_seconds == 12.5


def test_tokenize_commands_parse_their_options(capsys):
    """One parser: tokenize/detokenize take the common options, reject a batch size of 0 like the others."""
    args = build_parser().parse_args(["tokenize", "a.tar", "b.tar", "-o", "out", "--model", "some/dir",
                                      "--batch-size", "3", "--keep-columns", "text", "speaker", "--format",
                                      "arrayrecord", "--streaming", "--retry-errors", "--no-progress"])
    assert (args.inputs, args.output, args.model, args.batch_size, args.keep_columns, args.format) == (
        ["a.tar", "b.tar"], Path("out"), "some/dir", 3, ["text", "speaker"], "arrayrecord")
    assert args.streaming and args.retry_errors and args.no_progress and args.retries == 3
    for command in (["tokenize", "a.tar", "-o", "out"], ["detokenize", "codes/", "-o", "wav"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--batch-size", "0"])
        assert exit_info.value.code == 2
        assert "--batch-size: must be an integer >= 1, got '0'" in capsys.readouterr().err
