"""End-to-end parity with Transformers on the tiny random checkpoint (float32).

Targets: codes identical, latents max abs err < 1e-4, audio max abs err < 1e-3 and SNR >= 60 dB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_audio_close, assert_nontrivial

from convert.kaldi_reference import reference_feature_extractor
from convert.metrics import snr_db

LATENT_TOL = 1e-4


def _np(features) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in features.items()}


@pytest.fixture(scope="module")
def alone(clips):
    """Transformers' features of each clip on its own."""
    return [dict(reference_feature_extractor()(c, sampling_rate=16000, return_tensors="pt")) for c in clips]


def test_single_item_matches_transformers(reference, alone):
    features = alone[1]
    with torch.no_grad():
        want = reference.torch_model(**features, output_latents=True)
    got = reference.model(**_np(features), output_latents=True)

    np.testing.assert_array_equal(got.audio_codes, want.audio_codes.numpy())
    np.testing.assert_array_equal(got.audio_codes_mask, want.audio_codes_mask.numpy())
    assert np.abs(got.latents - want.latents.numpy()).max() < LATENT_TOL
    assert_audio_close(got.audio_values, want.audio_values.numpy())
    assert_nontrivial(got.audio_codes, got.audio_values)


def test_encode_decode_match_transformers(reference, alone):
    features = alone[0]
    with torch.no_grad():
        want_enc = reference.torch_model.encode(**features, output_latents=True)
        want_from_codes = reference.torch_model.decode(audio_codes=want_enc.audio_codes).audio_values.numpy()
        want_from_latents = reference.torch_model.decode(latents=want_enc.latents).audio_values.numpy()
    got_enc = reference.model.encode(**_np(features), output_latents=True)
    got_from_codes = reference.model.decode(audio_codes=got_enc.audio_codes).audio_values
    got_from_latents = reference.model.decode(latents=got_enc.latents).audio_values

    np.testing.assert_array_equal(got_enc.audio_codes, want_enc.audio_codes.numpy())
    assert got_enc.audio_codes.dtype == np.int32
    assert np.abs(got_enc.latents - want_enc.latents.numpy()).max() < LATENT_TOL
    assert_audio_close(got_from_codes, want_from_codes)
    assert_audio_close(got_from_latents, want_from_latents)
    assert_nontrivial(got_enc.audio_codes, got_from_codes)


def test_padded_batch_matches_transformers_on_the_same_batch(reference, torch_features):
    """Without ``padding_mask`` our model computes what Transformers computes on the padded batch."""
    with torch.no_grad():
        want = reference.torch_model(**torch_features, output_latents=True)
    features = _np(torch_features)
    got = reference.model(features["input_values"], features["input_features"],
                          input_features_mask=features["input_features_mask"], output_latents=True)

    np.testing.assert_array_equal(got.audio_codes, want.audio_codes.numpy())
    assert np.abs(got.latents - want.latents.numpy()).max() < LATENT_TOL
    assert_audio_close(got.audio_values, want.audio_values.numpy())
    with_mask = reference.model.encode(**features)
    np.testing.assert_array_equal(with_mask.audio_codes_mask, want.audio_codes_mask.numpy())


def test_padding_exact_batch_equals_each_item_alone(reference, torch_features, alone):
    """With ``padding_mask`` every item of a padded batch is encoded and decoded exactly as alone."""
    got = reference.model(**_np(torch_features), output_latents=True)
    for i, features in enumerate(alone):
        with torch.no_grad():
            want = reference.torch_model(**features, output_latents=True)
        frames, samples = want.audio_codes.shape[-1], want.audio_values.shape[-1]
        np.testing.assert_array_equal(got.audio_codes[i, :, :frames], want.audio_codes[0].numpy())
        assert np.abs(got.latents[i, :, :frames] - want.latents[0].numpy()).max() < LATENT_TOL
        assert_audio_close(got.audio_values[i, :, :samples], want.audio_values[0].numpy())
        assert not got.audio_values[i, :, samples:].any(), "audio after an item's end must be zero"
    # Transformers' own padded batch is not padding-exact: the shorter item differs near its end.
    with torch.no_grad():
        batched = reference.torch_model(**torch_features).audio_codes.numpy()
        short = reference.torch_model(**alone[0]).audio_codes.numpy()
    assert (batched[0, :, : short.shape[-1]] != short[0]).any()


def test_padding_mask_with_a_channel_axis(reference, torch_features):
    """``padding_mask`` (B, 1, T), the shape Transformers documents, works as (B, T) does; the codes mask then
    comes back (B, 1, F), as from Transformers."""
    features = _np(torch_features)
    with_channel = {**features, "padding_mask": features["padding_mask"][:, None, :]}
    flat = reference.model.encode(**features, output_latents=True)
    got = reference.model.encode(**with_channel, output_latents=True)
    with torch.no_grad():
        want = reference.torch_model.encode(**{k: torch.from_numpy(v) for k, v in with_channel.items()})
    np.testing.assert_array_equal(got.audio_codes, flat.audio_codes)
    np.testing.assert_array_equal(got.latents, flat.latents)
    assert got.audio_codes_mask.shape == tuple(want.audio_codes_mask.shape) == (2, 1, flat.audio_codes.shape[-1])
    np.testing.assert_array_equal(got.audio_codes_mask, want.audio_codes_mask.numpy())
    np.testing.assert_array_equal(got.audio_codes_mask[:, 0], flat.audio_codes_mask)
    with pytest.raises(ValueError, match=r"padding_mask must be \(2, \d+\) or \(2, 1, \d+\)"):
        reference.model.encode(**{**features, "padding_mask": np.repeat(with_channel["padding_mask"], 2, axis=1)})


def test_decode_with_codes_mask_equals_each_item_alone(reference, torch_features):
    encoded = reference.model.encode(**_np(torch_features))
    got = reference.model.decode(audio_codes=encoded.audio_codes, audio_codes_mask=encoded.audio_codes_mask)
    for i, valid in enumerate(encoded.audio_codes_mask.sum(-1)):
        codes = torch.from_numpy(encoded.audio_codes[i : i + 1, :, :valid]).long()
        with torch.no_grad():
            want = reference.torch_model.decode(audio_codes=codes).audio_values.numpy()
        assert_audio_close(got.audio_values[i, :, : want.shape[-1]], want[0])
        assert not got.audio_values[i, :, want.shape[-1]:].any()


def test_decode_rejects_bad_codes(reference):
    with pytest.raises(ValueError, match=r"must lie in \[0, 65536\)"):
        reference.model.decode(audio_codes=np.full((1, 1, 4), 65536, np.int32))
    with pytest.raises(ValueError, match="integer"):
        reference.model.decode(audio_codes=np.zeros((1, 1, 4), np.float32))
    with pytest.raises(ValueError, match="Either `audio_codes` or `latents`"):
        reference.model.decode()


def test_encode_rejects_mismatched_shapes(reference, torch_features):
    features = _np(torch_features)
    with pytest.raises(ValueError, match="multiple of 320"):
        reference.model.encode(features["input_values"][..., :-1], features["input_features"])
    with pytest.raises(ValueError, match="input_features must have shape"):
        reference.model.encode(features["input_values"], features["input_features"][:, :-1])


def test_audio_bound_is_relative_too():
    """Quiet audio that is wrong by half its amplitude passes an absolute 1e-3 bound but not the SNR bound."""
    want = 2e-3 * np.sin(np.linspace(0, 200 * np.pi, 16000))
    assert snr_db(want, want + 0.1 * want) == pytest.approx(20.0)
    assert_audio_close(want + 1e-7 * np.cos(np.arange(16000)), want)
    assert np.abs(1.5 * want - want).max() < 1e-3
    with pytest.raises(AssertionError, match=r"SNR 6\.0 dB"):
        assert_audio_close(1.5 * want, want)
