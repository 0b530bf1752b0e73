"""The ``xcodec2-jax`` command: speech files <-> X-Codec2 codes, and checkpoint conversion.

Subcommands: ``encode`` (audio files -> one ``.npy`` of int32 codes each), ``decode`` (``.npy`` codes -> 16-bit
WAV each, at the model's output rate), ``roundtrip`` (one file through the codec), ``convert`` (any known
checkpoint layout -> Flax checkpoint), ``export`` (-> Transformers checkpoint), ``tokenize`` (a corpus ->
shards of code rows, :mod:`xcodec2_jax.tokenize`) and ``detokenize``.

Conventions:

* Output names come from the input stems (``a/x.wav`` -> ``OUT/x.npy``). Two inputs that would write the same
  output (``a/x.wav`` and ``b/x.flac``) are refused before any work starts, rather than silently overwriting
  one result or inventing names the user cannot map back. Existing output files are overwritten.
* Exit status: 0 success; 1 the inputs, checkpoint or file system got in the way (unreadable audio, bad
  codes, missing checkpoint, unwritable output); 2 a usage error (bad arguments, colliding outputs);
  130 interrupted. Such errors print one line, ``xcodec2-jax: error: <message>``, on stderr and no traceback;
  ``--debug`` or ``XCODEC2_JAX_DEBUG=1`` re-raises them to show it. A user error is an
  :class:`~xcodec2_jax.errors.Xcodec2Error` (raised by the library for bad audio, codes, config or checkpoint
  and an unreachable Hub) or an ``OSError`` the operating system raised about a named file (permission
  denied, disk full). Anything else is a bug: its traceback is printed with a line asking to report it, and
  the exit status is 70 (``EX_SOFTWARE``), so that it never reads like bad input.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from safetensors import safe_open

from . import __version__
from .audio import load_audio, save_audio
from .codes import check_codes
from .engine import EngineSettings, enable_compilation_cache
from .errors import Xcodec2Error
from .features import Xcodec2FeatureExtractor
from .hub import (
    CONFIG_NAME,
    DEFAULT_REPO_ID,
    FLAX_WEIGHTS_NAME,
    PREPROCESSOR_CONFIG_NAME,
    TRANSFORMERS_WEIGHTS_NAME,
    resolve_checkpoint_dir,
)
from .model import Xcodec2Model
from .streaming import DEFAULT_SETTINGS, StreamingDecoder
from .tokenize import detokenize_corpus, tokenize_corpus
from .tokenize.checkpoint import DTYPES
from .tokenize.checkpoint import load_model as load_named_model
from .tokenize.pipeline import DEFAULT_RETRIES, DEFAULT_SHARD_SIZE, DEFAULT_WORKERS
from .tokenize.store import ERRORS_NAME, FORMATS

PROG = "xcodec2-jax"
EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130
ISSUES_URL = "https://github.com/xcodec2-jax/xcodec2-jax/issues"
DEBUG_ENV = "XCODEC2_JAX_DEBUG"
# X-Codec2's audio rate; audio files are resampled to it when read.
SAMPLING_RATE = 16000
NPY_MAGIC = b"\x93NUMPY"
# Long messages (a CheckpointError lists every bad key) are cut so the error stays one readable line.
MAX_MESSAGE_CHARS = 600
# A write to an open file that fails for want of space names no file, and is no bug either.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CliError(Xcodec2Error):
    """A user error found by the command line itself; ``exit_code`` is 1 (runtime) or 2 (usage)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------- helpers
def load_model(args: argparse.Namespace) -> Xcodec2Model:
    """The model named by ``--model`` / ``--revision`` / ``--dtype``."""
    return load_named_model(args.model, args.revision, args.dtype).model


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """Engine settings from ``--batch-size``, ``--full-batch-seconds`` and ``--buckets`` (the other knobs keep
    their defaults)."""
    return EngineSettings(batch_size=args.batch_size, full_batch_seconds=args.full_batch_seconds,
                          bucket_seconds=tuple(args.buckets))


def _show_progress(args: argparse.Namespace, count: int) -> bool:
    """A progress bar only pays for itself with several files."""
    return count > 1 and not args.no_progress


def output_paths(inputs: Sequence[str], output_dir: Path, suffix: str) -> list[Path]:
    """``output_dir / (stem + suffix)`` for each input; raises ``CliError`` (usage) when two would collide."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CliError(f"{output_dir}: exists and is not a directory", EXIT_USAGE)
    claimed: dict[str, str] = {}
    outputs = []
    for source in inputs:
        target = output_dir / (Path(source).stem + suffix)
        # Case-folded so that x.wav and X.wav also collide on case-insensitive file systems (macOS, Windows).
        key = target.name.casefold()
        if key in claimed:
            raise CliError(f"{claimed[key]} and {source} would both be written to {target}; give the inputs "
                           "distinct file names or process them in separate runs", EXIT_USAGE)
        claimed[key] = source
        outputs.append(target)
    return outputs


def make_output_dir(path: Path) -> None:
    """Create ``path`` (and parents) now, so an unusable output directory fails before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"{path}: cannot create the output directory ({err.strerror or err})") from err


def load_codes(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` of codes as written by ``encode``: a non-empty 1-D integer array (range checked once the
    model's codebook size is known)."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    with path.open("rb") as f:
        # np.load would try anything without the .npy magic as a pickle and blame "pickled data".
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise CliError(f"{path}: not a .npy file (it does not start with the NumPy header)")
        f.seek(0)
        try:
            array = np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, EOFError) as err:  # truncated data, object arrays
            raise CliError(f"{path}: not a readable .npy file ({err})") from err
    check_codes(array, str(path), codebook_size=None)
    if array.size == 0:
        raise CliError(f"{path}: holds no codes")
    return array


def _file_size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.2f} GB"


def parameter_count(weights: Path) -> int:
    """Number of parameters stored in a safetensors file (read from its header, no tensor loaded)."""
    with safe_open(str(weights), framework="numpy") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118


# -------------------------------------------------------------------------------------------- commands
def run_encode(args: argparse.Namespace) -> int:
    """``encode``: audio files -> ``OUT_DIR/<stem>.npy`` (1-D int32 codes)."""
    outputs = output_paths(args.inputs, Path(args.output_dir), ".npy")
    # Read the audio before loading the model, so a bad file fails in a second rather than after the load.
    waves = [load_audio(path, SAMPLING_RATE) for path in args.inputs]
    make_output_dir(Path(args.output_dir))
    model = load_model(args)
    codes = model.encode_audio(waves, SAMPLING_RATE, progress=_show_progress(args, len(waves)),
                               settings=engine_settings(args))
    for source, target, item in zip(args.inputs, outputs, codes, strict=True):
        np.save(target, item)
        print(f"{source} -> {target}: {item.size} codes ({item.size / model.config.frame_rate:.2f} s)")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """``decode``: ``.npy`` codes -> ``OUT_DIR/<stem>.wav`` (16 kHz, 16-bit PCM)."""
    outputs = output_paths(args.inputs, Path(args.output_dir), ".wav")
    codes = [load_codes(path) for path in args.inputs]
    make_output_dir(Path(args.output_dir))
    model = load_model(args)
    for path, item in zip(args.inputs, codes, strict=True):
        check_codes(item, str(path), model.config.codebook_size)
    rate = model.output_sampling_rate
    if args.stream:
        decoder = StreamingDecoder(model, args.chunk_frames, args.left_context_frames, args.lookahead_frames)
        for source, target, item in zip(args.inputs, outputs, codes, strict=True):
            samples, first, total = decode_streaming(decoder, item, target, rate)
            print(f"{source} -> {target}: {item.size} codes, {samples / rate:.2f} s at {rate} Hz, streamed: "
                  f"time to first audio {first * 1e3:.0f} ms, real-time factor {samples / rate / total:.1f}")
        return 0
    audio = model.decode_codes(codes, progress=_show_progress(args, len(codes)), settings=engine_settings(args))
    for source, target, item, wave in zip(args.inputs, outputs, codes, audio, strict=True):
        save_audio(target, wave, rate)
        print(f"{source} -> {target}: {item.size} codes, {wave.size / rate:.2f} s at {rate} Hz")
    return 0


def decode_streaming(decoder: StreamingDecoder, codes: np.ndarray, target: Path, rate: int) -> tuple[int, float, float]:
    """Push ``codes`` a chunk at a time (as if an LM were emitting them) and append each piece of audio to the
    16-bit WAV ``target`` as it comes: (samples written, seconds to the first audio, seconds in all)."""
    chunk = decoder.settings.chunk_frames
    first, samples = None, 0
    with sf.SoundFile(target, "w", rate, 1, "PCM_16") as out:
        begin = time.perf_counter()
        for start in range(0, codes.size + chunk, chunk):
            audio = decoder.push(codes[start : start + chunk]) if start < codes.size else decoder.flush()
            if audio.size:
                first = time.perf_counter() - begin if first is None else first
                out.write(np.clip(audio, -1.0, 1.0))  # as save_audio: 16-bit PCM would wrap out-of-range samples
                out.flush()  # the header and data on disk now cover everything written so far
                samples += audio.size
    return samples, first, time.perf_counter() - begin


def run_roundtrip(args: argparse.Namespace) -> int:
    """``roundtrip``: encode then decode one file, to hear what the codec keeps."""
    output = Path(args.output)
    if output.is_dir():
        raise CliError(f"{output}: is a directory; -o expects an audio file name such as out.wav", EXIT_USAGE)
    wave = load_audio(args.input, SAMPLING_RATE)
    model = load_model(args)
    settings = engine_settings(args)
    codes = model.encode_audio(wave, SAMPLING_RATE, settings=settings)[0]
    audio = model.decode_codes(codes, settings=settings)[0]
    rate = model.output_sampling_rate
    save_audio(output, audio, rate)
    print(f"{args.input}: {wave.size / SAMPLING_RATE:.2f} s -> {codes.size} codes "
          f"({model.config.frame_rate:g} codes/s) -> {output}: {audio.size / rate:.2f} s at {rate} Hz")
    return 0


def _rewrite_checkpoint(args: argparse.Namespace, save_format: str, weights_name: str, verb: str) -> int:
    """Load ``--src`` (any known layout) and save it to ``--out`` in ``save_format``, with its extractor config."""
    source = resolve_checkpoint_dir(args.src, args.revision)  # one Hub lookup shared by model and extractor
    out = Path(args.out)
    if out.exists() and out.resolve() == source.resolve():
        raise CliError(f"--out {out} is the source checkpoint itself; choose another directory", EXIT_USAGE)
    model = Xcodec2Model.from_pretrained(source)
    model.save_pretrained(out, format=save_format)
    # The source's own extractor config when it has one that fits the model, else the one the model expects.
    extractor = Xcodec2FeatureExtractor.from_config(model.config)
    origin = "for the model: the source has none"
    if (source / PREPROCESSOR_CONFIG_NAME).is_file():
        extractor, origin = Xcodec2FeatureExtractor.from_pretrained(source), "from the source"
    extractor.save_pretrained(out)
    print(f"{verb} {args.src} -> {out}")
    for name, note in ((CONFIG_NAME, ""), (weights_name, ""), (PREPROCESSOR_CONFIG_NAME, f", {origin}")):
        print(f"  {out / name} ({_file_size(out / name)}{note})")
    print(f"parameters: {parameter_count(out / weights_name):,}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """``convert``: any known checkpoint layout (directory or Hub id) -> a Flax checkpoint directory."""
    return _rewrite_checkpoint(args, "flax", FLAX_WEIGHTS_NAME, "converted")


def run_export(args: argparse.Namespace) -> int:
    """``export``: any checkpoint this library loads -> a Transformers checkpoint (model.safetensors)."""
    return _rewrite_checkpoint(args, "transformers", TRANSFORMERS_WEIGHTS_NAME, "exported")


def run_tokenize(args: argparse.Namespace) -> int:
    """``tokenize``: 0 when done, 1 when every input was bad."""
    summary = tokenize_corpus(
        args.inputs[0] if len(args.inputs) == 1 else args.inputs, args.output, model=args.model,
        revision=args.revision, dtype=args.dtype, batch_size=args.batch_size,
        full_batch_seconds=args.full_batch_seconds, buckets=args.buckets, shard_size=args.shard_size,
        workers=args.workers, process_index=args.process_index, process_count=args.process_count,
        split=args.split, audio_column=args.audio_column,
        streaming=args.streaming, keep_columns=args.keep_columns, output_format=args.format, retries=args.retries,
        retry_errors=args.retry_errors, overwrite=args.overwrite, progress=not args.no_progress)
    print(summary)
    if summary.all_bad:
        raise CliError(f"all {summary.inputs} inputs are bad; reasons in {args.output / ERRORS_NAME}")
    return 0


def run_detokenize(args: argparse.Namespace) -> int:
    """``detokenize``: shards of code rows -> ``WAV_DIR/<id>.wav``."""
    paths = detokenize_corpus(args.codes_dir, args.output, model=args.model, revision=args.revision,
                              dtype=args.dtype, ids=args.ids, batch_size=args.batch_size,
                              full_batch_seconds=args.full_batch_seconds, buckets=args.buckets,
                              progress=not args.no_progress)
    print(f"wrote {len(paths)} WAV file(s) under {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _seconds_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0 or 'none', got {text!r}")
    return value


def _natural(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _base_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--debug", action="store_true",
                      help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
    return base


def _common_options(base: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of every subcommand that runs the model (also handed to the tokenize module's subcommands)."""
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    group = common.add_argument_group("model and runtime options")
    group.add_argument("--model", default=DEFAULT_REPO_ID, metavar="DIR_OR_REPO",
                       help="checkpoint: a local directory (Transformers or converted Flax) or a Hugging Face Hub "
                            "repo id (default: %(default)s). Offline, use a local directory or set "
                            "HF_HUB_OFFLINE=1 to read the Hub cache only")
    group.add_argument("--revision", help="Hub branch, tag or commit of --model")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                       help="compute dtype (default: %(default)s); bfloat16 is faster on accelerators, and its "
                            "codes may differ from float32 ones")
    group.add_argument("--batch-size", type=_positive_int, default=EngineSettings.batch_size, metavar="N",
                       help="clips per step, split among the devices (default: %(default)s); fewer at buckets "
                            "longer than --full-batch-seconds")
    group.add_argument("--full-batch-seconds", type=_seconds_or_none, default=EngineSettings.full_batch_seconds,
                       metavar="SECONDS",
                       help="buckets up to this length take --batch-size clips, longer ones fewer (powers of two "
                            "per device, at least one each) within batch size x this many seconds of audio "
                            "(default: %(default)s); 'none': --batch-size clips at every bucket, which bigger "
                            "steps on GPU/TPU may prefer")
    group.add_argument("--buckets", type=float, nargs="+", metavar="SECONDS", default=EngineSettings.bucket_seconds,
                       help="padded lengths, each compiled once (default: "
                            f"{' '.join(f'{b:g}' for b in EngineSettings.bucket_seconds)}); a few coarse buckets "
                            "compile faster for a handful of files")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-compile-cache", action="store_true",
                       help="do not use the persistent compilation cache (default location: "
                            "~/.cache/xcodec2_jax/jax, or $XCODEC2_JAX_CACHE; JAX_COMPILATION_CACHE_DIR wins)")
    return common


ENCODE_EPILOG = f"""\
Reads any format soundfile can (WAV, FLAC, OGG, ...), mixes to mono and resamples to 16 kHz. Writes
OUT_DIR/<stem>.npy per input: 1-D int32 codes, 50 per second. Inputs whose outputs would share a name are
refused; existing outputs are overwritten.

examples:
  {PROG} encode speech.wav -o codes/
  {PROG} encode data/*.flac -o codes/ --batch-size 16
  HF_HUB_OFFLINE=1 {PROG} encode a.wav --model ./xcodec2-hf -o codes/
"""

DECODE_EPILOG = f"""\
Reads .npy files of 1-D integer codes in [0, 65536) (as `{PROG} encode` writes) and writes
OUT_DIR/<stem>.wav per input: 16-bit PCM at the model's output rate (X-Codec2 16 kHz, 320 samples per code;
NeuCodec 24 kHz; Anime-XCodec2 44.1 kHz).

examples:
  {PROG} decode codes/speech.npy -o decoded/
  {PROG} decode codes/*.npy -o decoded/ --no-progress
  {PROG} decode codes/speech.npy -o decoded/ --stream     # progressive WAV, prints time to first audio
"""

ROUNDTRIP_EPILOG = f"""\
Encodes one file, decodes its codes and writes the result: a quick way to hear what the codec keeps.

examples:
  {PROG} roundtrip speech.wav -o speech.xcodec2.wav
  {PROG} roundtrip speech.flac -o out.wav --model ./xcodec2-hf --dtype bfloat16
"""

CONVERT_EPILOG = f"""\
Loads a checkpoint (config.json + model.safetensors, or shards) from a directory or the Hub: Transformers'
X-Codec2 or NeuCodec, or the original xcodec2 release and its fine-tunes (detected by their keys; safetensors
only, .ckpt/.pth are refused), and writes OUT: config.json, flax_model.safetensors (Flax layout, loads
without torch) and preprocessor_config.json (copied, or the model's when the source has none).

examples:
  {PROG} convert --src HKUSTAudio/xcodec2-hf --out ./xcodec2-flax
  {PROG} convert --src ./xcodec2-original --out ./xcodec2-flax
"""

EXPORT_EPILOG = f"""\
Loads any checkpoint this library reads (a converted Flax one included, e.g. after fine-tuning in JAX) and
writes OUT as a Transformers checkpoint: config.json, model.safetensors and preprocessor_config.json, which
transformers' Xcodec2Model / NeuCodecModel.from_pretrained loads with no missing or unexpected keys.
Checkpoints with a decoder upsampler (Anime-XCodec2 44.1 kHz) have no Transformers model and are refused.

examples:
  {PROG} export --src ./xcodec2-finetuned-flax --out ./xcodec2-finetuned-hf
  {PROG} export --src ./xcodec2-original --out ./xcodec2-hf
"""

TOKENIZE_EPILOG = f"""\
Writes OUT_DIR/codes-PPPPP-SSSSS.parquet (columns id, codes, num_codes, duration_s, orig_sampling_rate and
the --keep-columns), or with --format arrayrecord codes-PPPPP-SSSSS.array_record + index-PPPPP-SSSSS.parquet,
plus {ERRORS_NAME} (bad inputs and why) and manifest.json. Ids are paths relative to the input folder, manifest
ids, tar sample keys (spk0/utt0001), or dataset / Parquet ids or row numbers. Running the same command again
resumes, also after kill -9: every input ends up in exactly one row or one error. Exit status 1 when every
input is bad.

examples:
  {PROG} tokenize data/wavs -o tokens/
  {PROG} tokenize "shards/emilia-*.tar" -o tokens/ --keep-columns text speaker --format arrayrecord
  {PROG} tokenize train-*.parquet -o tokens/ --audio-column audio --keep-columns text
  {PROG} tokenize someone/speech-corpus --streaming --split train -o tokens/ --keep-columns text
  {PROG} tokenize train.jsonl -o tokens/ --batch-size 32 --buckets 5 10 20 30
  {PROG} tokenize data/wavs -o tokens/ --process-index 3 --process-count 8   # job 3 of 8
"""

DETOKENIZE_EPILOG = f"""\
Writes WAV_DIR/<id>.wav (16-bit PCM at the model's output rate): "/" in ids become subfolders, ".wav" is
appended unless the id ends with it; ids with ".." are refused. The model must be the one that made the codes.

examples:
  {PROG} detokenize tokens/ -o decoded/
  {PROG} detokenize tokens/ -o decoded/ --ids spk1/utt01.flac spk2/utt07.wav
"""

MAIN_EPILOG = f"""\
Run `{PROG} COMMAND --help` for a command's options and examples. Exit status: 0 success, 1 bad input,
checkpoint or file, 2 usage error, 70 a bug in xcodec2-jax (printed with its traceback: please report it).
Errors print one line; --debug or {DEBUG_ENV}=1 shows the traceback.
"""


def _add_command(subparsers, name: str, handler: Callable[[argparse.Namespace], int], summary: str,
                 epilog: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=summary, description=summary, epilog=epilog, parents=parents,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _add_corpus_commands(subparsers, common: argparse.ArgumentParser) -> None:
    """``tokenize`` and ``detokenize`` (:mod:`xcodec2_jax.tokenize`)."""
    tokenize = _add_command(subparsers, "tokenize", run_tokenize, "encode a corpus into shards of code rows",
                            TOKENIZE_EPILOG, [common])
    tokenize.add_argument("inputs", nargs="+", metavar="INPUT",
                          help="a folder of audio files (recursive), a .txt manifest (a path a line), a .jsonl "
                               "manifest ({'path', 'id', ...} a line), WebDataset .tar shards or .parquet files "
                               "(paths or a quoted glob), or a Hugging Face dataset (a Hub name or a "
                               "save_to_disk folder; needs `datasets`)")
    tokenize.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR",
                          help="output folder; an existing one made with the same model and settings is resumed")
    tokenize.add_argument("--format", choices=FORMATS, default="parquet",
                          help="shard format (default: %(default)s; arrayrecord needs `array_record`)")
    tokenize.add_argument("--keep-columns", nargs="+", default=[], metavar="NAME",
                          help="metadata fields to copy into each row as string columns of the same names "
                               "(e.g. text speaker: a tar sample's .json fields and .txt as text, a manifest's "
                               "fields, a dataset's columns)")
    tokenize.add_argument("--workers", type=_positive_int, default=DEFAULT_WORKERS, metavar="N",
                          help="threads decoding audio ahead of the device (default: %(default)s)")
    tokenize.add_argument("--shard-size", type=_positive_int, default=DEFAULT_SHARD_SIZE, metavar="ROWS",
                          help="rows per shard (default: %(default)s)")
    tokenize.add_argument("--split", help="dataset split")
    tokenize.add_argument("--audio-column", default="audio", help="dataset or Parquet audio column "
                                                                  "(default: %(default)s)")
    tokenize.add_argument("--streaming", action="store_true",
                          help="read a Hugging Face dataset as a stream (IterableDataset): nothing downloaded "
                               "up front")
    tokenize.add_argument("--process-index", type=int, metavar="I",
                          help="this job's index among --process-count independent jobs")
    tokenize.add_argument("--process-count", type=_positive_int, metavar="N",
                          help="split the corpus among this many independent jobs")
    tokenize.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                          help="retries of an input whose reading fails with an I/O or memory error, with "
                               "exponential backoff, before it is logged as bad (default: %(default)s)")
    tokenize.add_argument("--retry-errors", action="store_true", help="try the inputs logged as bad again")
    tokenize.add_argument("--overwrite", action="store_true",
                          help="delete the outputs of a run with another model, numerics, format or columns "
                               "instead of refusing")

    detokenize = _add_command(subparsers, "detokenize", run_detokenize, "decode shards of code rows to WAV files",
                              DETOKENIZE_EPILOG, [common])
    detokenize.add_argument("codes_dir", metavar="CODES_DIR", help="a folder written by `tokenize`")
    detokenize.add_argument("-o", "--output", required=True, type=Path, metavar="WAV_DIR",
                            help="folder for the 16 kHz WAV files")
    detokenize.add_argument("--ids", nargs="+", help="decode only these ids (default: all)")


def build_parser() -> argparse.ArgumentParser:
    """The ``xcodec2-jax`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description="X-Codec2 speech codec in JAX: 16 kHz speech <-> "
                                     "one code in [0, 65536) per 20 ms.", epilog=MAIN_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    base = _base_options()
    common = _common_options(base)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    encode = _add_command(subparsers, "encode", run_encode, "encode audio files to .npy code files",
                          ENCODE_EPILOG, [common])
    encode.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio files")
    encode.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="directory for the .npy files")

    decode = _add_command(subparsers, "decode", run_decode, "decode .npy code files to 16 kHz WAV files",
                          DECODE_EPILOG, [common])
    decode.add_argument("inputs", nargs="+", metavar="CODES.npy", help=".npy files of 1-D integer codes")
    decode.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="directory for the .wav files")
    stream = decode.add_argument_group("streaming (xcodec2_jax.streaming.StreamingDecoder)")
    stream.add_argument("--stream", action="store_true",
                        help="decode each file as a stream, a chunk of codes at a time as an LM would emit them: "
                             "the WAV grows as the audio comes; prints the time to first audio")
    stream.add_argument("--chunk-frames", type=_positive_int, default=DEFAULT_SETTINGS.chunk_frames, metavar="N",
                        help="with --stream: frames decoded per step (default: %(default)s)")
    stream.add_argument("--left-context-frames", type=_natural, default=DEFAULT_SETTINGS.left_context_frames,
                        metavar="N", help="with --stream: frames of left context per step (default: %(default)s)")
    stream.add_argument("--lookahead-frames", type=_natural, default=DEFAULT_SETTINGS.lookahead_frames,
                        metavar="N", help="with --stream: frames of lookahead per step (default: %(default)s)")

    roundtrip = _add_command(subparsers, "roundtrip", run_roundtrip, "encode and decode one audio file",
                             ROUNDTRIP_EPILOG, [common])
    roundtrip.add_argument("input", metavar="AUDIO", help="audio file")
    roundtrip.add_argument("-o", "--output", required=True, metavar="OUT.wav",
                           help="decoded audio (format from the extension, 16-bit PCM)")

    for name, handler, summary, epilog in (
        ("convert", run_convert, "convert a checkpoint (any known layout) to a Flax checkpoint", CONVERT_EPILOG),
        ("export", run_export, "export a checkpoint to a Transformers checkpoint", EXPORT_EPILOG),
    ):
        command = _add_command(subparsers, name, handler, summary, epilog, [base])
        command.add_argument("--src", required=True, metavar="DIR_OR_REPO",
                             help="checkpoint: local directory or Hub repo id")
        command.add_argument("--out", required=True, metavar="DIR", help="directory to write the checkpoint to")
        command.add_argument("--revision", help="Hub branch, tag or commit of --src")

    _add_corpus_commands(subparsers, common)
    return parser


# ------------------------------------------------------------------------------------------------ main
def _enable_compile_cache() -> None:
    """The persistent compilation cache (JAX_COMPILATION_CACHE_DIR when set, else ours)."""
    try:
        enable_compilation_cache()
    except OSError as err:  # an unwritable cache only costs start-up time: warn, don't fail
        print(f"{PROG}: warning: compilation cache disabled ({err})", file=sys.stderr)


def user_error_message(err: BaseException) -> str | None:
    """The one-line report of a user error, or None when ``err`` is a bug.

    User errors: :class:`Xcodec2Error` (the library's verdict on the inputs), an ``OSError`` that the
    operating system raised about a named file (``errno`` and ``filename`` set: permission denied, a read-only
    directory) and a full disk. A bare ``ValueError``, ``KeyError``, ``OSError`` about no file, ... is a bug.
    """
    if isinstance(err, Xcodec2Error):
        return _one_line(str(err) or type(err).__name__)
    if not isinstance(err, OSError) or err.errno is None:
        return None
    if err.filename is None:
        return _one_line(err.strerror or os.strerror(err.errno)) if err.errno in _DISK_FULL else None
    files = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else f"{err.filename}"
    return _one_line(f"{files}: {err.strerror or os.strerror(err.errno)}")


def _one_line(text: str) -> str:
    """``text`` as one line: its first line, the rest joined with "; ", cut to ``MAX_MESSAGE_CHARS``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "... (--debug shows the full message)"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad arguments)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        if not getattr(args, "no_compile_cache", True):
            _enable_compile_cache()
        return args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug:
            raise
        message = user_error_message(err)
        if message is None:
            traceback.print_exc()
            print(f"{PROG}: internal error: the {type(err).__name__} above is a bug in xcodec2-jax, not a problem "
                  f"with your input. Please report it at {ISSUES_URL} with the command you ran and this traceback.",
                  file=sys.stderr)
            return EXIT_BUG
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return err.exit_code if isinstance(err, CliError) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
