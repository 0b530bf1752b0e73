"""Streaming decode: exact lengths for any pushes, one compilation per settings, batched streams equal each
alone, quality against the full decode at the default settings, and ``decode --stream``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from conftest import assert_nontrivial
from flax import nnx

from convert.metrics import snr_db
from convert.speech import speech_clip
from xcodec2_jax import cli
from xcodec2_jax.engine import EngineSettings
from xcodec2_jax.nn.decoder import KeyValues
from xcodec2_jax.streaming import DEFAULT_SETTINGS, BatchedStreamingDecoder, StreamingDecoder, num_compilations

# The engine tests' 8 s bucket (tests/test_engine.py): encoding and the full decode share its compilations.
EIGHT_SECONDS = EngineSettings(batch_size=4, full_batch_seconds=None, bucket_seconds=(8.0,), window_seconds=8.0)
# Small windows for the tests that are about bookkeeping rather than quality: they compile in a second.
SMALL = {"chunk_frames": 6, "left_context_frames": 5, "lookahead_frames": 3}


@pytest.fixture(scope="module")
def speech_codes(reference) -> np.ndarray:
    """Codes of 7.7 s of espeak-ng speech (385 frames) from the tiny reference model."""
    return reference.model.encode_audio(speech_clip(7.7, seed=3), settings=EIGHT_SECONDS)[0]


@pytest.fixture(scope="module")
def default_decoder(reference) -> StreamingDecoder:
    return StreamingDecoder(reference.model)


def _random_pushes(decoder: StreamingDecoder, codes: np.ndarray, rng: np.random.Generator,
                   largest: int) -> list[np.ndarray]:
    """Push ``codes`` in random pieces of 0 .. largest codes, then flush: the pieces of audio returned."""
    cuts = np.cumsum(rng.integers(0, largest + 1, codes.size + 1))
    pieces = [decoder.push(part) for part in np.split(codes, cuts[cuts < codes.size])]
    return [*pieces, decoder.flush()]


def test_default_stream_any_push_sizes(reference, speech_codes, default_decoder):
    """Exact length and the same audio for any split into pushes; >= 10 dB SNR against the full decode."""
    full = reference.model.decode_codes(speech_codes, settings=EIGHT_SECONDS)[0]
    hop = reference.model.config.hop_length
    one_by_one = np.concatenate([*(default_decoder.push(code[None]) for code in speech_codes),
                                 default_decoder.flush()])
    assert one_by_one.dtype == np.float32 and one_by_one.shape == (speech_codes.size * hop,)
    rng = np.random.default_rng(0)
    for largest in (1, 7, 40, 400):
        pieces = _random_pushes(default_decoder, speech_codes, rng, largest)
        assert all(p.size % (DEFAULT_SETTINGS.chunk_frames * hop) == 0 for p in pieces[:-1])  # whole chunks
        np.testing.assert_array_equal(np.concatenate(pieces), one_by_one)
    assert_nontrivial(speech_codes, one_by_one)
    snr = snr_db(full, one_by_one)
    assert snr >= 10.0, f"streamed vs full decode: {snr:.1f} dB"
    # A stream shorter than a chunk plus its lookahead is decoded by flush() in one window: the full decode.
    short = speech_codes[: DEFAULT_SETTINGS.chunk_frames + DEFAULT_SETTINGS.lookahead_frames - 1]
    streamed = np.concatenate(_random_pushes(default_decoder, short, rng, 5))
    np.testing.assert_allclose(streamed, reference.model.decode_codes(short, settings=EIGHT_SECONDS)[0], atol=1e-5)


def test_lengths_reset_and_one_compilation(reference, speech_codes):
    """Any stream length and split, reset mid-stream, a second decoder: all from ONE compiled step."""
    lowered = []

    def listener(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # every jit lowering, cached or not
            lowered.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _stream_everything(reference, speech_codes)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(lowered) == 1, lowered


def _stream_everything(reference, speech_codes) -> None:
    before = num_compilations(reference.model)
    decoder = StreamingDecoder(reference.model, **SMALL)
    hop, rng = decoder.hop, np.random.default_rng(1)
    window = sum(SMALL.values())
    for total in (0, 1, 8, 9, 10, 14, 15, window, window + 1, 97):
        for largest in (0, 1, 4, 20):
            pieces = _random_pushes(decoder, speech_codes[:total], rng, largest)
            assert sum(p.size for p in pieces) == total * hop, (total, largest)
    decoder.push(speech_codes[:30])
    decoder.reset()  # drops the stream: the next one starts from scratch
    again = StreamingDecoder(reference.model, **SMALL)
    np.testing.assert_array_equal(np.concatenate(_random_pushes(decoder, speech_codes[:50], rng, 9)),
                                  np.concatenate(_random_pushes(again, speech_codes[:50], rng, 3)))
    assert num_compilations(reference.model) == before + 1


def test_batched_joins_and_leaves_equal_each_stream_alone(reference, speech_codes):
    """Streams join, finish and leave at different steps; each one's audio equals decoding it alone."""
    alone = StreamingDecoder(reference.model, **SMALL)
    batched = BatchedStreamingDecoder(reference.model, slots=3, **SMALL)
    assert batched.state is reference.model.device_model().state  # the engines' weights, not a second copy
    streams = {name: np.roll(speech_codes, 11 * k)[:length]
               for k, (name, length) in enumerate({"a": 40, "b": 23, "c": 7, "d": 31, "dropped": 30}.items())}
    joins = {"a": 0, "b": 0, "dropped": 2, "c": 5, "d": 9}  # first tick at which each stream may start
    slots, sent, audio, last = {}, dict.fromkeys(streams, 0), {name: [] for name in streams}, {}
    for tick in range(200):
        for name, codes in streams.items():
            if name not in slots and name not in last and tick >= joins[name] and len(slots) < batched.slots:
                slots[name] = batched.join()
            if name == "dropped" and tick == 4:
                batched.leave(slots.pop(name))  # leaves mid-stream: "c" takes its slot
                last[name] = None
            if name in slots and name not in last and sent[name] < codes.size:
                count = 1 + tick % 4
                batched.push(slots[name], codes[sent[name] : sent[name] + count])
                sent[name] = min(codes.size, sent[name] + count)
                if sent[name] == codes.size:
                    batched.finish(slots[name])
        by_slot = {slot: name for name, slot in slots.items()}
        for piece in batched.step():
            name = by_slot[piece.slot]
            audio[name].append(piece.audio)
            if piece.last:
                last[name] = slots.pop(name)
        if len(last) == 5:
            break
    assert sorted(last) == ["a", "b", "c", "d", "dropped"] and not batched.active
    assert batched.step() == []  # nothing to do: no device call
    for name in "abcd":
        want = np.concatenate([alone.push(streams[name]), alone.flush()])
        got = np.concatenate(audio[name])
        assert got.shape == want.shape == (streams[name].size * alone.hop,)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


SHARDED = """
import json, sys
import jax
import jax.numpy as jnp
import numpy as np
from xcodec2_jax import Xcodec2Model
from xcodec2_jax.streaming import BatchedStreamingDecoder, StreamingDecoder
assert jax.device_count() == 2, jax.devices()
model = Xcodec2Model.from_pretrained(sys.argv[1])
codes = np.load(sys.argv[2])
settings = json.loads(sys.argv[3])
batched = BatchedStreamingDecoder(model, slots=3, **settings)  # rounded up to 4 slots, 2 per device
assert batched.slots == 4 and batched.mesh.size == 2
streams = [codes[:40], codes[5:30], codes[9:20]]
slots = [batched.join() for _ in streams]
for slot, stream in zip(slots, streams):
    batched.push(slot, stream)
    batched.finish(slot)
out = {slot: [] for slot in slots}
while batched.ready():
    for piece in batched.step():
        out[piece.slot].append(piece.audio)
alone = StreamingDecoder(model, **settings)
worst = max(float(np.abs(np.concatenate(out[slot]) - np.concatenate([alone.push(s), alone.flush()])).max())
            for slot, s in zip(slots, streams))
print(json.dumps({"worst": worst}))
"""


def test_batched_streams_sharded_over_two_devices(reference, speech_codes, tmp_path):
    np.save(tmp_path / "codes.npy", speech_codes)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED), str(reference.checkpoint),
                          str(tmp_path / "codes.npy"), json.dumps(SMALL)], env=env, check=True, timeout=600,
                         capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["worst"] < 1e-5


def test_cli_decode_stream(reference, speech_codes, tmp_path, capsys):
    codes = speech_codes[:100]
    np.save(tmp_path / "speech.npy", codes)
    args = ["decode", str(tmp_path / "speech.npy"), "-o", str(tmp_path / "out"), "--stream", "--model",
            str(reference.checkpoint), *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items())]
    assert cli.main(args) == 0
    assert "time to first audio" in capsys.readouterr().out
    wave, rate = sf.read(tmp_path / "out" / "speech.wav", dtype="float32")
    decoder = StreamingDecoder(reference.model, **SMALL)
    want = np.concatenate([decoder.push(codes), decoder.flush()])
    assert rate == reference.model.config.sampling_rate and wave.shape == want.shape
    assert np.abs(wave - np.clip(want, -1, 1)).max() <= 1.01 / 32768  # 16-bit PCM rounding


def test_memory_pools_like_one_sequence(reference):
    """The decoder's memory hook: GroupNorm statistics and attention over [memory frames; x] equal those of
    the concatenated sequence (memory entries masked out are ignored)."""
    decoder = nnx.merge(reference.model.graphdef, reference.model.state).acoustic_decoder
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, (2, 30, reference.model.config.hidden_size)), jnp.float32)
    garbage = jnp.asarray(rng.normal(0.0, 5.0, x[:, :7].shape), jnp.float32)
    before, after = jnp.concatenate([x[:, :18], garbage], axis=1), x[:, 18:]
    keep = jnp.broadcast_to(jnp.arange(25) < 18, (2, 25))

    norm = decoder.prior_net[0].norm1
    moments = jnp.where(keep[..., None, None], norm.moments(before), 0.0)
    np.testing.assert_allclose(norm(after, None, moments), norm(x)[:, 18:], atol=2e-5)

    attention = decoder.layers[0].self_attn
    _, own = attention(before, None)
    pooled, _ = attention(after, None, KeyValues(own.keys, own.values, keep))
    np.testing.assert_allclose(pooled, attention(x, None)[0][:, 18:], atol=2e-5)


def test_memory_holds_the_last_frames_emitted(reference, speech_codes):
    """The ring buffer wraps: after every step it holds exactly the last M emitted frames, M rounded up to
    whole chunks (10 -> 12 frames here)."""
    decoder = StreamingDecoder(reference.model, **SMALL, memory_frames=10)
    chunk, step = SMALL["chunk_frames"], SMALL["chunk_frames"] + SMALL["lookahead_frames"]
    pushed = 0
    for total in (9, 17, 40, 61):  # emitted: 6, 12, 36, 54 frames
        decoder.push(speech_codes[pushed:total])
        pushed = total
        emitted = (total - step) // chunk * chunk + chunk
        held = np.asarray(decoder._batch._memory.frames)[0]
        assert sorted(held[held >= 0]) == list(range(max(0, emitted - 12), emitted)), total
