"""Each Flax module against its Transformers twin, weights copied through the converter (float32)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xcodec2_jax.nn.antialias import sin_squared
from xcodec2_jax.nn.quantizer import FSQ


@pytest.fixture(scope="module")
def codec(reference):
    return nnx.merge(reference.model.graphdef, reference.model.state)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _max_err(got, want: torch.Tensor) -> float:
    return float(np.abs(np.asarray(got) - want.detach().numpy()).max())


def test_sin_squared_matches_float64():
    x = _rng().uniform(-300, 300, 200_000).astype(np.float32)
    assert np.abs(np.asarray(sin_squared(jnp.asarray(x))) - np.sin(x.astype(np.float64)) ** 2).max() < 3e-7


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_anti_aliased_activation(reference, codec, scale):
    """The polyphase form equals the reference's upsample -> SnakeBeta -> downsample, edges included."""
    x = (scale * _rng(1).standard_normal((2, 8, 203))).astype(np.float32)
    with torch.no_grad():
        want = reference.torch_model.acoustic_encoder.block[0].res_unit1.snake1(torch.from_numpy(x))
    got = codec.acoustic_encoder.block[0].res_unit1.snake1(jnp.asarray(x))
    assert _max_err(got, want) < 2e-6 * max(scale, 1.0)


def test_anti_aliased_activation_with_lengths_equals_each_item_alone(reference, codec):
    x = _rng(2).standard_normal((2, 8, 64)).astype(np.float32)
    lengths = np.array([64, 37])
    got = np.asarray(codec.acoustic_encoder.block[0].snake1(jnp.asarray(x), jnp.asarray(lengths)))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            want = reference.torch_model.acoustic_encoder.block[0].snake1(torch.from_numpy(x[i : i + 1, :, :n]))
        assert _max_err(got[i : i + 1, :, :n], want) < 2e-6


def test_acoustic_encoder(reference, codec, torch_features):
    waveform = torch_features["input_values"]
    with torch.no_grad():
        want = reference.torch_model.acoustic_encoder(waveform).transpose(1, 2)
    got = codec.acoustic_encoder(jnp.asarray(waveform.numpy()))
    assert _max_err(got, want) < 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("masked", [False, True])
def test_semantic_encoder(reference, codec, torch_features, masked):
    features, mask = torch_features["input_features"], torch_features["input_features_mask"]
    with torch.no_grad():
        want = reference.torch_model.semantic_encoder(features, attention_mask=mask if masked else None)
    got = codec.semantic_encoder(jnp.asarray(features.numpy()), jnp.asarray(mask.numpy()) if masked else None)
    valid = mask.numpy().astype(bool)
    assert np.abs(np.asarray(got)[valid] - want.last_hidden_state.numpy()[valid]).max() < 1e-4


def test_semantic_adapter(reference, codec):
    hidden = _rng(3).standard_normal((2, 19, 32)).astype(np.float32)
    with torch.no_grad():
        want = reference.torch_model.semantic_adapter(torch.from_numpy(hidden).transpose(1, 2)).transpose(1, 2)
    assert _max_err(codec.semantic_adapter(jnp.asarray(hidden)), want) < 1e-4


def test_quantizer_codes_indices_and_codebook(reference, codec, torch_features):
    captured = {}  # the real quantizer input: fc_encoder's output on speech
    hook = reference.torch_model.fc_encoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        reference.torch_model.encode(**torch_features)
    hook.remove()
    hidden = captured["out"].numpy()
    with torch.no_grad():
        want_latents, want_indices = reference.torch_model.quantizer(torch.from_numpy(hidden))
        want_from_codes = reference.torch_model.quantizer.from_codes(want_indices)
    latents, indices = codec.quantizer(jnp.asarray(hidden))
    np.testing.assert_array_equal(np.asarray(indices), want_indices[..., 0].numpy())
    assert len(np.unique(np.asarray(indices))) > 50
    assert _max_err(latents, want_latents) < 1e-5
    assert _max_err(codec.quantizer.from_indices(indices), want_from_codes) < 1e-5


@pytest.mark.parametrize("levels", [(4, 4, 4, 4, 4, 4, 4, 4), (8, 5, 5, 5), (3, 7, 2)])
def test_fsq_constants_match_transformers(levels):
    from transformers import Xcodec2Config
    from transformers.models.xcodec2.modeling_xcodec2 import Xcodec2FiniteScalarQuantization

    reference = Xcodec2FiniteScalarQuantization(Xcodec2Config(quantization_levels=list(levels)))
    z = torch.from_numpy((2 * _rng(5).standard_normal((1000, len(levels)))).astype(np.float32))
    fsq = FSQ(levels)
    with torch.no_grad():
        want_codes, want_indices = reference(reference.bound(z))
        want_codebook = reference.codebook.numpy()
    codes, indices = fsq.quantize(fsq.bound(jnp.asarray(z.numpy())))
    np.testing.assert_array_equal(np.asarray(indices), want_indices.numpy())
    np.testing.assert_array_equal(np.asarray(codes), want_codes.numpy())
    all_indices = jnp.arange(int(np.prod(levels)))
    np.testing.assert_array_equal(np.asarray(fsq.codes_from_indices(all_indices)), want_codebook)


def test_decoder(reference, codec):
    latents = _rng(6).standard_normal((2, 23, 96)).astype(np.float32)
    with torch.no_grad():
        want = reference.torch_model.acoustic_decoder(torch.from_numpy(latents))[:, 0]
    got = codec.acoustic_decoder(jnp.asarray(latents))
    assert got.shape == want.shape == (2, 23 * 320)
    assert _max_err(got, want) < 1e-4 * max(1.0, float(want.abs().max()))


def test_decoder_with_lengths_equals_each_item_alone(reference, codec):
    latents = _rng(7).standard_normal((2, 23, 96)).astype(np.float32)
    lengths = np.array([23, 11])
    got = np.asarray(codec.acoustic_decoder(jnp.asarray(latents), jnp.asarray(lengths)))
    for i, n in enumerate(lengths):
        with torch.no_grad():
            want = reference.torch_model.acoustic_decoder(torch.from_numpy(latents[i : i + 1, :n]))[:, 0]
        assert _max_err(got[i : i + 1, : n * 320], want) < 1e-4 * max(1.0, float(want.abs().max()))


def test_istft_head(reference, codec):
    hidden = _rng(8).standard_normal((2, 9, 64)).astype(np.float32)
    with torch.no_grad():
        want = reference.torch_model.acoustic_decoder.head(torch.from_numpy(hidden))[:, 0]
    got = codec.acoustic_decoder.head(jnp.asarray(hidden), None)
    assert _max_err(got, want) < 1e-4 * max(1.0, float(want.abs().max()))
