"""The inference engine: padding-exact batches, bucketing, windows, many devices, many processes."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import assert_audio_close, assert_nontrivial

from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from xcodec2_jax.engine import EngineSettings, Window, plan_windows

# One bucket of 8 s: the 4 clips below share one compilation.
EIGHT_SECONDS = EngineSettings(batch_size=4, bucket_seconds=(8.0,), window_seconds=8.0)


@pytest.fixture(scope="module")
def four_clips() -> list[np.ndarray]:
    return [speech_clip(seconds, seed=i) for i, seconds in enumerate((1.3, 2.9, 4.0, 7.7))]


def _alone(torch_model, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transformers on one clip: its valid codes and the audio decoded from them."""
    features = dict(reference_feature_extractor()(clip, sampling_rate=16000, return_tensors="pt"))
    with torch.no_grad():
        encoded = torch_model.encode(**features)
        codes = encoded.audio_codes[..., : int(encoded.audio_codes_mask.sum())]
        audio = torch_model.decode(audio_codes=codes).audio_values
    return codes[0, 0].numpy(), audio[0, 0].numpy()


def test_batch_of_four_lengths_equals_each_clip_alone(reference, four_clips):
    codes = reference.model.encode_audio(four_clips, settings=EIGHT_SECONDS)
    audio = reference.model.decode_codes(codes, settings=EIGHT_SECONDS)
    assert reference.model.engine(EIGHT_SECONDS).num_compilations == 2  # one encode, one decode
    for clip, got_codes, got_audio in zip(four_clips, codes, audio, strict=True):
        want_codes, want_audio = _alone(reference.torch_model, clip)
        assert got_codes.dtype == np.int32 and got_codes.shape == want_codes.shape
        assert np.mean(got_codes == want_codes) >= 0.999
        assert got_audio.shape == want_audio.shape == (got_codes.size * 320,)
        assert_audio_close(got_audio, want_audio)
        assert_nontrivial(got_codes, got_audio)


def test_compilations_bounded_by_buckets(reference):
    rng = np.random.default_rng(0)
    lengths = rng.uniform(0.5, 20.0, 50)
    clips = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in lengths]
    settings = EngineSettings(batch_size=8, bucket_seconds=(5.0, 10.0, 20.0), window_seconds=20.0)
    codes = reference.model.encode_audio(clips, settings=settings)
    engine = reference.model.engine(settings)
    assert engine.num_compilations <= len(engine.buckets) == 3
    assert [c.size for c in codes] == [(clip.size + 1) // 320 for clip in clips]


def test_plan_windows_partition_and_context():
    assert plan_windows(100, 150, 20) == [Window(0, 100, 0, 100)]
    for total in (151, 400, 1000, 1501):
        windows = plan_windows(total, 150, 40)
        assert windows[0].keep_start == 0 and windows[-1].keep_end == total
        assert windows[-1].start + windows[-1].frames == total
        for w, nxt in itertools.pairwise(windows):
            assert w.keep_end == nxt.keep_start  # kept ranges tile the input
            assert w.keep_end - nxt.start >= 20 and w.start + w.frames - w.keep_end >= 20  # >= overlap/2 context
        assert all(w.frames == 150 for w in windows)


def test_long_audio_in_windows(reference):
    """Windowed encode keeps every code's context; windowed decode cross-fades to the full-length audio."""
    long = np.concatenate([speech_clip(7.7, seed=i) for i in range(3)])  # 23.1 s
    windowed = EngineSettings(batch_size=2, bucket_seconds=(8.0,), window_seconds=8.0, overlap_seconds=3.0)
    whole = EngineSettings(batch_size=1, bucket_seconds=(24.0,), window_seconds=24.0)
    codes = reference.model.encode_audio(long, settings=windowed)[0]
    full = reference.model.encode_audio(long, settings=whole)[0]
    assert codes.size == full.size == (long.size + 1) // 320
    match = np.mean(codes == full)
    print(f"windowed vs full-context code match: {match:.4f}")
    assert match > 0.9  # tiny random model: attention is global; the real model is more local
    audio = reference.model.decode_codes(full, settings=windowed)[0]
    assert audio.shape == (full.size * 320,) and np.isfinite(audio).all()


def test_eight_simulated_devices_give_the_same_codes(reference, four_clips, tmp_path):
    np.savez(tmp_path / "clips.npz", *four_clips)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from xcodec2_jax import Xcodec2Model
        from xcodec2_jax.engine import EngineSettings
        assert jax.device_count() == 8, jax.devices()
        clips = list(np.load({str(tmp_path / "clips.npz")!r}).values())
        model = Xcodec2Model.from_pretrained({str(reference.checkpoint)!r})
        codes = model.encode_audio(clips, settings=EngineSettings(batch_size=8, bucket_seconds=(8.0,),
                                                                   window_seconds=8.0))
        np.savez({str(tmp_path / "codes.npz")!r}, *codes)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=900)
    eight = list(np.load(tmp_path / "codes.npz").values())
    one = reference.model.encode_audio(four_clips, settings=EIGHT_SECONDS)
    for a, b in zip(one, eight, strict=True):
        np.testing.assert_array_equal(a, b)


MULTIHOST = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    port, rank, clips_file, checkpoint, out = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(rank))
    import numpy as np
    from xcodec2_jax import Xcodec2Model
    from xcodec2_jax.engine import EngineSettings
    clips = list(np.load(clips_file).values())
    mine = clips[int(rank)::2]  # each process feeds its own items; one has more than the other
    model = Xcodec2Model.from_pretrained(checkpoint)
    settings = EngineSettings(batch_size=1, bucket_seconds=(4.0, 8.0), window_seconds=8.0)
    codes = model.encode_audio(mine, settings=settings)
    json.dump({"devices": jax.device_count(), "codes": [c.tolist() for c in codes]}, open(out, "w"))
    """
)


def test_two_processes_with_jax_distributed(reference, four_clips, tmp_path):
    clips = [*four_clips, speech_clip(0.9, seed=9)]
    np.savez(tmp_path / "clips.npz", *clips)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(port), str(rank), str(tmp_path / "clips.npz"),
                               str(reference.checkpoint), str(tmp_path / f"out{rank}.json")])
             for rank in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in range(2)]
    assert all(r["devices"] == 2 for r in results)
    settings = EngineSettings(batch_size=2, bucket_seconds=(4.0, 8.0), window_seconds=8.0)
    want = reference.model.encode_audio(clips, settings=settings)
    for rank, result in enumerate(results):
        for got, expected in zip(result["codes"], want[rank::2], strict=True):
            np.testing.assert_array_equal(np.asarray(got, np.int32), expected)
