"""Parity report: the same checkpoint and audio through Transformers (torch CPU) and xcodec2-jax.

    python convert/check_parity.py --random-init            # seeded random full-size model, espeak-ng speech
    python convert/check_parity.py --src HKUSTAudio/xcodec2-hf --wav speech.wav

Prints the code match rate, max abs errors of latents and audio, the SNR of our audio against
Transformers' audio, and per-component max errors (each JAX component fed the Transformers input of that
component, so errors do not compound), as a Markdown table.

``--random-init`` builds ``Xcodec2Config()`` (629M parameters) with every parameter randomised and
``project_in`` calibrated so the FSQ input spans all levels (see ``convert/torch_reference.py``), so parity
can be shown without downloading weights. Needs torch and transformers==5.23.0 (the ``[test]`` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from convert.kaldi_reference import reference_feature_extractor
from convert.speech import speech_clip
from convert.torch_reference import (
    TorchXcodec2Config,
    TorchXcodec2Model,
    random_reference_model,
    torch_inputs,
)
from xcodec2_jax import Xcodec2FeatureExtractor, Xcodec2Model
from xcodec2_jax.audio import load_audio


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - estimate) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def max_err(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


class Capture:
    """Forward hooks recording the inputs and outputs of named torch submodules."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def record(module, args, output):
            self.inputs[name] = args
            self.outputs[name] = output
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def component_errors(torch_model: TorchXcodec2Model, model: Xcodec2Model, features: dict) -> list[tuple]:
    """(component, max abs err, max abs value of the reference) for each component, fed Transformers' inputs."""
    names = ["semantic_encoder", "semantic_adapter", "acoustic_encoder", "fc_encoder", "quantizer",
             "acoustic_decoder"]
    capture = Capture(torch_model, names)
    with torch.no_grad():
        encoded = torch_model.encode(**features, output_latents=True)
        torch_model.decode(latents=encoded.latents)
    capture.close()
    codec = nnx.merge(model.graphdef, model.state)
    x = {name: tuple(a.numpy() for a in capture.inputs[name] if isinstance(a, torch.Tensor)) for name in names}
    mask = features.get("input_features_mask")
    rows = []

    def add(name, got, want):
        rows.append((name, max_err(got, want), float(np.abs(want).max())))

    add("semantic encoder (last hidden state)",
        codec.semantic_encoder(jnp.asarray(features["input_features"].numpy()),
                               None if mask is None else jnp.asarray(mask.numpy())),
        capture.outputs["semantic_encoder"].last_hidden_state.numpy())
    add("semantic adapter", codec.semantic_adapter(jnp.asarray(x["semantic_adapter"][0]).transpose(0, 2, 1)),
        capture.outputs["semantic_adapter"].numpy().transpose(0, 2, 1))
    add("acoustic encoder", codec.acoustic_encoder(jnp.asarray(x["acoustic_encoder"][0])),
        capture.outputs["acoustic_encoder"].numpy().transpose(0, 2, 1))
    add("fc_encoder", codec.fc_encoder(jnp.asarray(x["fc_encoder"][0])), capture.outputs["fc_encoder"].numpy())
    latents, codes = codec.quantizer(jnp.asarray(x["quantizer"][0]))
    add("quantizer (latents)", latents, capture.outputs["quantizer"][0].numpy())
    rows.append(("quantizer (codes match)", float((np.asarray(codes) == capture.outputs["quantizer"][1][..., 0]
                                                    .numpy()).mean()), 1.0))
    add("Vocos decoder (audio)", codec.acoustic_decoder(jnp.asarray(x["acoustic_decoder"][0])),
        capture.outputs["acoustic_decoder"][:, 0].numpy())
    return rows


def build_models(args) -> tuple[TorchXcodec2Model, Xcodec2Model, Path]:
    if args.random_init:
        audio = speech_clip(args.seconds, seed=args.seed)
        calibration = torch_inputs(dict(reference_feature_extractor()(audio, sampling_rate=16000)))
        begin = time.perf_counter()
        torch_model = random_reference_model(TorchXcodec2Config(), args.seed, calibration)
        directory = Path(tempfile.mkdtemp(prefix="xcodec2-random-"))
        torch_model.save_pretrained(directory)
        print(f"random full-size model built and saved in {time.perf_counter() - begin:.1f} s ({directory})")
    else:
        torch_model = TorchXcodec2Model.from_pretrained(args.src, revision=args.revision, dtype=torch.float32)
        directory = Path(args.src)
    source = directory if directory.is_dir() else args.src
    return torch_model.eval().float(), Xcodec2Model.from_pretrained(source, revision=args.revision), directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="Transformers checkpoint: local directory or Hub repo id")
    source.add_argument("--random-init", action="store_true", help="seeded random full-size model")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--wav", type=Path, help="audio file (default: generated espeak-ng speech)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the generated speech")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch_model, model, _ = build_models(args)
    audio = load_audio(args.wav) if args.wav else speech_clip(args.seconds, seed=args.seed)
    reference = reference_feature_extractor()(audio, sampling_rate=16000, return_tensors="pt")
    ours = Xcodec2FeatureExtractor()(audio, sampling_rate=16000)
    features = {k: v for k, v in dict(reference).items()}

    begin = time.perf_counter()
    with torch.no_grad():
        want = torch_model(**features, output_latents=True)
    torch_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    got = model(**{k: v.numpy() for k, v in features.items()}, output_latents=True)
    jax_seconds = time.perf_counter() - begin

    codes, want_codes = got.audio_codes.ravel(), want.audio_codes.numpy().ravel()
    audio_got, audio_want = got.audio_values.ravel(), want.audio_values.numpy().ravel()
    print(f"\naudio: {audio.size / 16000:.2f} s; {codes.size} codes ({len(np.unique(want_codes))} distinct); "
          f"JAX device: {jax.devices()[0].device_kind}; torch {torch_seconds:.1f} s, JAX {jax_seconds:.1f} s "
          "(incl. compile)\n")
    print("| quantity | value |\n|---|---|")
    print(f"| code match rate | {np.mean(codes == want_codes):.4%} ({int(np.sum(codes != want_codes))} of "
          f"{codes.size} differ) |")
    print(f"| latents max abs err | {max_err(got.latents, want.latents.numpy()):.2e} |")
    print(f"| audio max abs err | {max_err(audio_got, audio_want):.2e} (peak {np.abs(audio_want).max():.3f}) |")
    print(f"| audio SNR vs Transformers | {snr_db(audio_want, audio_got):.1f} dB |")
    feature_err = max_err(ours["input_features"], reference["input_features"])
    print(f"| features (our extractor) max abs err | {feature_err:.2e} |")
    print("\n| component (fed Transformers' input) | max abs err | max abs reference value |\n|---|---|---|")
    for name, err, scale in component_errors(torch_model, model, features):
        print(f"| {name} | {err:.2e} | {scale:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
