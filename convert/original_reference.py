"""Test scaffolding: the original ``xcodec2`` 0.1.5 package's modules as the reference (needs torch).

``xcodec2.modeling_xcodec2.XCodec2Model.__init__`` downloads w2v-bert-2.0 and its feature extractor from the
Hub, and its ``from_pretrained`` fails under Transformers 5.x (which builds on the meta device). So
:func:`original_model` builds the same object from the package's own submodules with size arguments:
``PreTrainedModel.__init__`` with its ``BigCodecConfig``, then ``semantic_model`` (a ``Wav2Vec2BertModel`` from
a ``Wav2Vec2BertConfig``), ``SemanticEncoder_module``, ``CodecEnc``, ``generator``, ``fc_prior``,
``fc_post_a`` and the w2v-bert ``SeamlessM4TFeatureExtractor``, all with the attribute names its methods use,
so its unmodified ``encode_code`` / ``decode_code`` run on CPU.

The package imports ``torchtune.modules.RotaryPositionalEmbeddings``, whose top-level ``torchtune`` package
requires ``torchao``; as ``convert/kaldi_reference.py`` does for torchaudio, a stand-in ``torchtune`` package
holds only the installed, unmodified ``torchtune/modules/position_embeddings.py``, loaded by path. Install:
``pip install --no-deps xcodec2==0.1.5 torchtune==0.6.1 vector-quantize-pytorch==1.17.8 einops==0.8.0
einx==0.3.0 frozendict`` (the [test] extra does).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .kaldi_reference import _stand_in_package, reference_kaldi
from .torch_reference import FSQ_INPUT_STD, randomize_


def _install_torchtune_stand_in() -> None:
    if "torchtune.modules" in sys.modules:
        return
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("torchtune is not installed: pip install --no-deps torchtune==0.6.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "modules" / "position_embeddings.py"
    torchtune, modules = _stand_in_package("torchtune"), _stand_in_package("torchtune.modules")
    torchtune.modules = modules
    sys.modules["torchtune"], sys.modules["torchtune.modules"] = torchtune, modules
    file_spec = importlib.util.spec_from_file_location("torchtune.modules.position_embeddings", path)
    embeddings = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = embeddings
    file_spec.loader.exec_module(embeddings)
    modules.RotaryPositionalEmbeddings = embeddings.RotaryPositionalEmbeddings


def original_package():
    """The ``xcodec2`` package's modules: (modeling_xcodec2, codec_encoder, codec_decoder_vocos, module)."""
    reference_kaldi()  # the package imports torchaudio (bs_roformer5.py); see kaldi_reference.py
    _install_torchtune_stand_in()
    from xcodec2 import modeling_xcodec2
    from xcodec2.vq import codec_decoder_vocos, codec_encoder, module

    return modeling_xcodec2, codec_encoder, codec_decoder_vocos, module


@dataclasses.dataclass(frozen=True)
class OriginalSizes:
    """Size arguments of the original modules (their defaults: the released 823M-parameter model)."""

    ngf: int = 48
    hidden: int = 1024  # CodecEnc hidden_dim = decoder hidden_dim
    depth: int = 12
    heads: int = 16  # the decoder's RoPE dim (pos_meb_dim=64) must equal hidden / heads
    semantic_hidden: int = 1024
    semantic_layers: int = 24
    semantic_heads: int = 16
    semantic_intermediate: int = 4096
    semantic_kernel: int = 31


def original_model(sizes: OriginalSizes, seed: int, calibration: np.ndarray):
    """A float32 eval-mode original ``XCodec2Model`` with every parameter randomised (seeded), its
    ``project_in`` rescaled so the FSQ input spans all levels on ``calibration`` (16 kHz speech, (T,))."""
    modeling, codec_encoder, codec_decoder_vocos, module = original_package()
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel
    from transformers.modeling_utils import PreTrainedModel

    torch.manual_seed(seed)
    config = modeling.BigCodecConfig(semantic_hidden_size=sizes.semantic_hidden, codec_encoder_hidden_size=sizes.hidden,
                                     codec_decoder_hidden_size=sizes.hidden)
    model = modeling.XCodec2Model.__new__(modeling.XCodec2Model)
    PreTrainedModel.__init__(model, config)
    model.semantic_model = Wav2Vec2BertModel(Wav2Vec2BertConfig(
        hidden_size=sizes.semantic_hidden, num_hidden_layers=sizes.semantic_layers,
        num_attention_heads=sizes.semantic_heads, intermediate_size=sizes.semantic_intermediate,
        conv_depthwise_kernel_size=sizes.semantic_kernel, output_hidden_states=True))
    model.SemanticEncoder_module = module.SemanticEncoder(sizes.semantic_hidden, sizes.semantic_hidden,
                                                          sizes.semantic_hidden)
    model.CodecEnc = codec_encoder.CodecEncoder_Transformer(ngf=sizes.ngf, hidden_dim=sizes.hidden)
    vq_dim = sizes.hidden + sizes.semantic_hidden
    model.generator = codec_decoder_vocos.CodecDecoderVocos(hidden_dim=sizes.hidden, depth=sizes.depth,
                                                            heads=sizes.heads, pos_meb_dim=64, vq_dim=vq_dim)
    model.fc_prior = torch.nn.Linear(vq_dim, vq_dim)
    model.fc_post_a = torch.nn.Linear(vq_dim, sizes.hidden)
    # w2v-bert-2.0's preprocessor_config.json values
    model.feature_extractor = SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, padding_value=1.0,
                                                          sampling_rate=16000, stride=2)
    model.eval().float()
    randomize_(model, seed)
    calibrate_project_in_(model, calibration)
    return model


@torch.no_grad()
def calibrate_project_in_(model, wave: np.ndarray) -> None:
    """Rescale ``generator.quantizer.project_in`` so its output has std ``FSQ_INPUT_STD`` per dim on ``wave``."""
    layer = model.generator.quantizer.project_in
    captured = {}
    hook = layer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    model.encode_code(torch.from_numpy(wave)[None])
    hook.remove()
    out = captured["out"].reshape(-1, captured["out"].shape[-1])
    mean, std = out.mean(0), out.std(0).clamp_min(1e-6)
    layer.weight.mul_((FSQ_INPUT_STD / std)[:, None])
    layer.bias.copy_((layer.bias - mean) * FSQ_INPUT_STD / std)


def save_original_checkpoint(model, directory: Path, legacy: bool = False) -> Path:
    """``config.json`` + ``model.safetensors`` in the original layout (as the released checkpoint holds it).

    ``legacy``: the older spellings, weight norm as ``weight_g`` / ``weight_v`` and SnakeBeta's ``act.beta``.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if legacy:
        renames = ((".parametrizations.weight.original0", ".weight_g"),
                   (".parametrizations.weight.original1", ".weight_v"), (".act.bias", ".act.beta"))
        for old, new in renames:
            state = {k.replace(old, new) if k.endswith(old) else k: v for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n", "utf-8")
    return directory


def parameter_count(model) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
