"""Anime-XCodec2 44.1 kHz family: the original layout plus a decoder upsampler, on a tiny random checkpoint.

Its own modeling code (``xcodec2`` 0.1.7, a tarball on the Hugging Face Hub) cannot be fetched here. The
reference below re-states, in PyTorch, the upsampler that its keys and config fields name
(``generator.upsampler.{upsample_layers.i, resnet_blocks.i, out_proj}``, ``upsample_factors``,
``upsample_kernel_sizes``, ``sample_rate``, ``hop_length``) from the public source it matches:
Inworld TTS's ``tts/core/codec/upsampler.py`` ``UpSamplerBlock`` (per stage a weight-normed
``ConvTranspose1d(C / 2^i, C / 2^(i+1), k, u, padding=(k - u) // 2)`` and a ``ResnetBlock``, then
``silu(out_proj(x))``) placed as its ``Decoder.forward`` does: backbone (final LayerNorm included) ->
upsampler -> ISTFT head at ``hop_length``. A third-party ggml port of Anime-XCodec2-44.1kHz-v2
(telecomadm1145/xcodec2-ggml, ``xcodec2_graph.c``) computes the same graph. Everything else is the
``xcodec2`` 0.1.5 package's own modules (``WNConvTranspose1d``, ``ResnetBlock``, ``ISTFTHead``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_ORIGINAL, assert_nontrivial

from convert.original_reference import original_package, save_original_checkpoint
from convert.torch_reference import randomize_
from xcodec2_jax import Xcodec2Model

FACTORS, KERNELS, HOP, RATE = (3,), (9,), 294, 44100  # 294 * 3 = 882 samples per code = 44.1 kHz / 50
DECODE_TOL = 1e-4


class UpSamplerBlock(torch.nn.Module):
    """Re-statement of the upsampler (see the module docstring) with the ``xcodec2`` package's modules."""

    def __init__(self, channels: int, factors, kernels):
        super().__init__()
        _, _, codec_decoder_vocos, module = original_package()
        self.upsample_layers = torch.nn.ModuleList(
            module.WNConvTranspose1d(channels >> i, channels >> (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(factors, kernels, strict=True)))
        self.resnet_blocks = torch.nn.ModuleList(
            codec_decoder_vocos.ResnetBlock(in_channels=channels >> (i + 1), out_channels=channels >> (i + 1),
                                            temb_channels=0, dropout=0.0) for i in range(len(factors)))
        self.out_proj = torch.nn.Linear(channels >> len(factors), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, T * prod(factors), C)."""
        for upsample, block in zip(self.upsample_layers, self.resnet_blocks, strict=True):
            x = block(upsample(x))
        return torch.nn.functional.silu(self.out_proj(x.transpose(1, 2)))


@torch.no_grad()
def decode(model, codes: torch.Tensor) -> torch.Tensor:
    """The original ``decode_code`` with the upsampler between the backbone and the head: (B, 1, F) -> (B, T)."""
    emb = model.generator.quantizer.get_output_from_indices(codes.transpose(1, 2))
    hidden = model.generator.backbone(model.fc_post_a(emb))
    audio, _ = model.generator.head(model.generator.upsampler(hidden.transpose(1, 2)))
    return audio[:, 0]


@pytest.fixture(scope="module")
def anime(tmp_path_factory, original, original_clips):
    """The tiny original model with an upsampler and a 44.1 kHz head (random too), and codes of a clip."""
    torch_model = copy.deepcopy(original[0])
    _, _, codec_decoder_vocos, _ = original_package()
    torch_model.generator.upsampler = UpSamplerBlock(TINY_ORIGINAL.hidden, FACTORS, KERNELS)
    torch_model.generator.head = codec_decoder_vocos.ISTFTHead(dim=TINY_ORIGINAL.hidden, n_fft=4 * HOP, hop_length=HOP)
    randomize_(torch_model.generator.upsampler, seed=2)
    randomize_(torch_model.generator.head, seed=3)
    torch_model.eval()
    directory = save_original_checkpoint(torch_model, tmp_path_factory.mktemp("tiny-anime"))
    config = json.loads((directory / "config.json").read_text())
    config.update(sample_rate=RATE, hop_length=HOP, upsample_factors=list(FACTORS), upsample_kernel_sizes=list(KERNELS))
    (directory / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        codes = torch_model.encode_code(torch.from_numpy(original_clips[1])[None])
    return torch_model, Xcodec2Model.from_pretrained(directory), codes


def test_config_rates(anime):
    model = anime[1]
    assert model.output_sampling_rate == RATE and model.config.output_hop_length == 882
    assert model.config.n_fft == 4 * HOP and model.config.upsample_factors == FACTORS


def test_decode_matches_the_restated_reference(anime):
    torch_model, model, codes = anime
    want = decode(torch_model, codes)[0].numpy()
    got = model.decode_codes(codes[0, 0].numpy())[0]
    assert got.shape == want.shape == (codes.shape[-1] * 882,)
    print(f"anime 44.1 kHz decode: max abs err {np.abs(got - want).max():.3g} (peak {np.abs(want).max():.3g})")
    assert np.abs(got - want).max() < DECODE_TOL
    assert_nontrivial(codes.numpy(), got)
