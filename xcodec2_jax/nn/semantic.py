"""Wav2Vec2-BERT conformer encoder (the semantic model) and X-Codec2's semantic adapter convs.

Channels-last throughout: (B, F, C) with F the number of stacked 20 ms log-mel frames.

``mask`` (B, F) marks valid frames. Padded frames never reach valid ones: attention ignores them as keys,
the conformer's depthwise conv is causal (left padding only) and sees them zeroed, and the adapter convs
see them zeroed, exactly like the zero padding an item gets when processed alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import SemanticConfig
from .layers import Array, Conv1d, LayerNorm, Linear, Numerics, RelativeKey, activation, attention


class FeatureProjection(nnx.Module):
    """LayerNorm + Linear: (B, F, 160) -> (B, F, hidden)."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.feature_projection_input_dim
        self.layer_norm = LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
        self.projection = Linear(dim, config.hidden_size, numerics=numerics, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.projection(self.layer_norm(x))


class FeedForward(nnx.Module):
    """Linear -> activation -> Linear: (B, F, hidden) -> (B, F, hidden)."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        self.intermediate_dense = Linear(config.hidden_size, config.intermediate_size, numerics=numerics,
                                         rngs=rngs)
        self.output_dense = Linear(config.intermediate_size, config.hidden_size, numerics=numerics, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: Array) -> Array:
        return self.output_dense(self.act(self.intermediate_dense(x)))


class Embedding(nnx.Module):
    """A lookup table (rows, features), used here as a matrix (relative-key distance embeddings)."""

    def __init__(self, rows: int, features: int, *, numerics: Numerics, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (rows, features), numerics.param_dtype))


class SelfAttention(nnx.Module):
    """Multi-head attention with Shaw relative-key position bias, distances clamped to [-left, right]."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.linear_q = Linear(dim, dim, numerics=numerics, rngs=rngs)
        self.linear_k = Linear(dim, dim, numerics=numerics, rngs=rngs)
        self.linear_v = Linear(dim, dim, numerics=numerics, rngs=rngs)
        self.linear_out = Linear(dim, dim, numerics=numerics, rngs=rngs)
        self.distance_embedding = Embedding(config.num_distances, config.head_size, numerics=numerics,
                                            rngs=rngs)
        self.num_heads, self.head_size = config.num_attention_heads, config.head_size
        self.left, self.right = config.left_max_position_embeddings, config.right_max_position_embeddings
        self.numerics = numerics

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x (B, F, hidden), mask (B, F) bool or None -> (B, F, hidden)."""
        b, f, _ = x.shape
        split = lambda h: h.reshape(b, f, self.num_heads, self.head_size)
        q, k, v = split(self.linear_q(x)), split(self.linear_k(x)), split(self.linear_v(x))
        # Transformers adds the relative term scaled like the scores: (q.k + q.e) / sqrt(head_size).
        relative = RelativeKey(self.distance_embedding.embedding[...], self.left, self.right)
        out = attention(q, k, v, numerics=self.numerics, relative=relative, key_mask=mask)
        return self.linear_out(out.reshape(b, f, -1))


class CausalDepthwiseConv1d(nnx.Module):
    """Per-channel causal FIR, y[t] = sum_j kernel[j] * x[t - (k - 1) + j]: (B, F, C) -> (B, F, C).

    Written as k shifted multiply-adds: XLA:CPU runs a grouped ``conv_general_dilated`` with 1024
    groups an order of magnitude slower. Kernel layout (k, 1, C), as a Flax depthwise conv.
    """

    COMPUTE_DTYPE_WEIGHTS = ("kernel",)

    def __init__(self, channels: int, kernel_size: int, *, numerics: Numerics, rngs: nnx.Rngs):
        bound = kernel_size**-0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, 1, channels),
                                                   numerics.param_dtype, -bound, bound))
        self.numerics = numerics

    def __call__(self, x: Array) -> Array:
        kernel = self.kernel[...][:, 0].astype(self.numerics.dtype)
        k, f = kernel.shape[0], x.shape[1]
        padded = jnp.pad(x.astype(self.numerics.dtype), ((0, 0), (k - 1, 0), (0, 0)))
        out = padded[:, :f] * kernel[0]
        for j in range(1, k):
            out = out + padded[:, j:j + f] * kernel[j]
        return out


class ConvolutionModule(nnx.Module):
    """Conformer conv: LN, pointwise conv, GLU, causal depthwise conv, LN, activation, pointwise conv."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        dim, kernel = config.hidden_size, config.conv_depthwise_kernel_size
        self.layer_norm = LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
        self.pointwise_conv1 = Conv1d(dim, 2 * dim, 1, use_bias=False, numerics=numerics, rngs=rngs)
        self.depthwise_conv = CausalDepthwiseConv1d(dim, kernel, numerics=numerics, rngs=rngs)
        self.depthwise_layer_norm = LayerNorm(dim, eps=config.layer_norm_eps, rngs=rngs)
        self.pointwise_conv2 = Conv1d(dim, dim, 1, use_bias=False, numerics=numerics, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x (B, F, hidden), mask (B, F) bool or None -> (B, F, hidden)."""
        x = self.layer_norm(x)
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        value, gate = jnp.split(self.pointwise_conv1(x), 2, axis=-1)
        x = self.depthwise_conv(value * jax.nn.sigmoid(gate))
        return self.pointwise_conv2(self.act(self.depthwise_layer_norm(x)))


class ConformerLayer(nnx.Module):
    """Macaron conformer block: half FFN, self-attention, conv module, half FFN, final LayerNorm."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.ffn1_layer_norm = LayerNorm(dim, eps=eps, rngs=rngs)
        self.ffn1 = FeedForward(config, numerics=numerics, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(dim, eps=eps, rngs=rngs)
        self.self_attn = SelfAttention(config, numerics=numerics, rngs=rngs)
        self.conv_module = ConvolutionModule(config, numerics=numerics, rngs=rngs)
        self.ffn2_layer_norm = LayerNorm(dim, eps=eps, rngs=rngs)
        self.ffn2 = FeedForward(config, numerics=numerics, rngs=rngs)
        self.final_layer_norm = LayerNorm(dim, eps=eps, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        x = x + 0.5 * self.ffn1(self.ffn1_layer_norm(x))
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.conv_module(x, mask)
        x = x + 0.5 * self.ffn2(self.ffn2_layer_norm(x))
        return self.final_layer_norm(x)


class ConformerEncoder(nnx.Module):
    """The stack of conformer layers (Transformers' ``Wav2Vec2BertEncoder``)."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        self.layers = nnx.List([ConformerLayer(config, numerics=numerics, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def __call__(self, x: Array, mask: Array | None) -> Array:
        if mask is not None:
            x = jnp.where(mask[..., None], x, 0.0)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SemanticEncoder(nnx.Module):
    """Wav2Vec2-BERT: stacked log-mel (B, F, 160) -> last hidden state (B, F, hidden)."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        self.feature_projection = FeatureProjection(config, numerics=numerics, rngs=rngs)
        self.encoder = ConformerEncoder(config, numerics=numerics, rngs=rngs)

    def __call__(self, features: Array, mask: Array | None = None) -> Array:
        """``mask`` (B, F) of valid frames (bool or 0/1), or None when all frames are valid."""
        if mask is not None:
            mask = mask.astype(bool)
        return self.encoder(self.feature_projection(features), mask)


class SemanticAdapter(nnx.Module):
    """Four k=3 convs with ReLUs and a residual: (B, F, hidden) -> (B, F, hidden)."""

    def __init__(self, config: SemanticConfig, *, numerics: Numerics, rngs: nnx.Rngs):
        dim = config.hidden_size
        conv = lambda bias: Conv1d(dim, dim, 3, padding=(1, 1), use_bias=bias, numerics=numerics, rngs=rngs)
        self.conv1, self.conv2, self.conv3, self.conv4 = conv(False), conv(True), conv(True), conv(False)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """``mask`` (B, F) valid frames or None; padded frames enter each conv as zeros."""
        if mask is not None:
            mask = mask.astype(bool)[..., None]
        residual = jax.nn.relu(self.conv1(x, mask))
        x = jax.nn.relu(self.conv2(residual, mask))
        x = self.conv3(x, mask) + residual
        return self.conv4(x, mask)
