"""Building blocks of the DDPM++ U-Net (after yang-song/score_sde, ``models/layerspp.py``).

Conventions: images are NHWC; parameters are always float32, while activations are
computed in ``dtype`` (float32 or bfloat16 for mixed precision). Softmax and group-norm
statistics are taken in float32 so bfloat16 stays numerically safe.
"""
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.conv import conv_general_dilated

Dtype = Any
Initializer = Callable[..., jax.Array]


def default_init(scale: float = 1.0) -> Initializer:
    """DDPM weight init: uniform variance scaling over ``fan_avg``.

    ``scale == 0`` means "start (almost) at zero": score_sde uses 1e-10 rather than an
    exact zero so the layer still receives a well-defined, non-degenerate gradient.
    """
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int,
                           max_positions: float = 10000.0) -> jax.Array:
    """Transformer-style sinusoidal embedding of one scalar per example.

    Args:
      timesteps: shape ``(batch,)``, any real values (e.g. ``999 * t`` or ``log sigma``).
      embedding_dim: output width; odd widths are zero-padded by one column.
      max_positions: sets the longest wavelength (10000 as in DDPM / transformers).

    Returns:
      float32 array of shape ``(batch, embedding_dim)``: ``[sin(t w_i), cos(t w_i)]``.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (batch,), got {timesteps.shape}")
    half = embedding_dim // 2
    # Geometric frequencies from 1 down to 1/max_positions.
    freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar (score_sde's ``embedding_type='fourier'``).

    The frequencies are a parameter only so they are saved with the checkpoint; they are
    frozen with ``stop_gradient``.
    """
    embedding_size: int = 256
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        proj = x.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def group_norm(x: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """GroupNorm with score_sde's group count ``min(C // 4, 32)`` (at least one group)."""
    groups = max(min(x.shape[-1] // 4, 32), 1)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)(x)


def conv3x3(x: jax.Array, features: int, init_scale: float = 1.0,
            dtype: Dtype = jnp.float32) -> jax.Array:
    """3x3 'SAME' convolution with DDPM init and zero bias (call inside a compact module)."""
    return nn.Conv(features, kernel_size=(3, 3), padding="SAME", dtype=dtype,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_general_dilated)(x)


def conv1x1(x: jax.Array, features: int, init_scale: float = 1.0,
            dtype: Dtype = jnp.float32) -> jax.Array:
    """1x1 convolution with DDPM init (channel mixing, used for resized skip paths)."""
    return nn.Conv(features, kernel_size=(1, 1), padding="SAME", dtype=dtype,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_general_dilated)(x)


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling of an NHWC tensor (the ``fir=False`` path)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Average pooling over non-overlapping ``factor x factor`` windows (``fir=False``)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block with time conditioning and optional 2x resampling.

    ``GN -> SiLU -> [resample] -> conv3x3 -> + Dense(SiLU(temb)) -> GN -> SiLU -> dropout
    -> conv3x3 (near-zero init)``; the skip path is resampled the same way and mapped
    with a 1x1 conv whenever the shape changes. With ``skip_rescale`` the sum is divided
    by sqrt(2) to keep the activation variance roughly constant through depth.
    """
    out_ch: Optional[int] = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array], train: bool) -> jax.Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = nn.silu(group_norm(x, self.dtype))
        if self.up:
            h, x = naive_upsample_2d(h), naive_upsample_2d(x)
        elif self.down:
            h, x = naive_downsample_2d(h), naive_downsample_2d(x)
        h = conv3x3(h, out_ch, dtype=self.dtype)
        if temb is not None:
            # Per-channel bias from the noise-level embedding.
            bias = nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(nn.silu(temb))
            h = h + bias[:, None, None, :]
        h = nn.silu(group_norm(h, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        # Near-zero init makes every block start as (scaled) identity.
        h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if in_ch != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch, dtype=self.dtype)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = group_norm(x, self.dtype).reshape(b, hgt * wid, c)
        # score_sde's NIN layers: per-position linear maps, q/k/v init at scale 0.1.
        q, k, v = (nn.Dense(c, kernel_init=default_init(0.1), dtype=self.dtype)(h) for _ in range(3))
        # Logits and softmax in float32: bf16 logits over H*W positions lose too much precision.
        logits = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32) * c ** -0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bnm,bmc->bnc", weights, v)
        h = nn.Dense(c, kernel_init=default_init(self.init_scale), dtype=self.dtype)(h)
        out = x + h.reshape(b, hgt, wid, c)
        return out / math.sqrt(2.0) if self.skip_rescale else out
