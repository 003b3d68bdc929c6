r"""Building blocks of NCSN++ (Song et al. 2021, score_sde's ``layerspp`` / ``up_or_down_sampling``).

Conventions: NHWC images, float32 parameters, activations in ``dtype``. The module and parameter
names (``ResnetBlockBigGANpp_3/Conv_1/kernel``, ``AttnBlockpp_0/NIN_2/W``, ``Conv2d_0/weight``,
``GaussianFourierProjection_0/W`` ...) are those of score_sde's Flax NCSN++, so its checkpoints (and
those of codes built on it) map one to one, and the PyTorch port's ``all_modules.<i>.<name>`` keys map
by position (see :mod:`diffusion_jax.interop.torch_ncsnpp`).

**FIR resampling** (StyleGAN2's ``upfirdn2d``). With the separable kernel k (e.g. (1, 3, 3, 1)) made
2-D as K = k k^T / (sum k)^2, one 2-D pass per channel is

    upfirdn(x; K, up, down, p0, p1) = downsample_down( correlate( pad_{p0,p1}( zero_insert_up(x) ), flip(K) ) ),

where zero_insert_up puts ``up - 1`` zeros after every pixel. For factor 2 and a kernel of length n:
upsample uses gain 4 K, ``up = 2``, pads ((n - 1) // 2 + 1, (n - 2) // 2); downsample uses K,
``down = 2``, pads ((n - 1) // 2, (n - 2) // 2). The fused FIR convolutions: conv-then-downsample filters
with pads ((p + 1) // 2, p // 2), p = n - 2 + (r - 1), and then applies an r x r conv with stride 2;
upsample-then-conv applies the r x r conv to the zero-inserted input (a stride-2 transposed conv) and
then filters with 4 K and pads ((p + 1) // 2 + 1, p // 2 + 1), p = n - 2 - (r - 1).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.conv import conv_general_dilated
from diffusion_jax.models.layers import default_init

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.silu, "relu": nn.relu, "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2)}


# ----------------------------------------------------------------------------- FIR resampling
def fir_kernel_2d(k: Sequence[float]) -> np.ndarray:
    """The 2-D FIR kernel k k^T / (sum k)^2 (float64 numpy; cast at use)."""
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 1 or k.size < 1:
        raise ValueError(f"fir_kernel must be a non-empty 1-D sequence, got {k!r}")
    k2 = np.outer(k, k)
    return k2 / k2.sum()


def upfirdn_2d(x: jax.Array, k2: np.ndarray, up: int = 1, down: int = 1,
               pad0: int = 0, pad1: int = 0) -> jax.Array:
    """Zero-insert by ``up``, pad (pad0, pad1) on both spatial axes, FIR-filter with ``k2``, keep every
    ``down``-th pixel; per channel, NHWC. Pads must be non-negative (all NCSN++ uses are)."""
    if pad0 < 0 or pad1 < 0:
        raise ValueError(f"negative FIR padding ({pad0}, {pad1}) is not supported")
    c = x.shape[-1]
    kh, kw = k2.shape
    # correlation with the flipped kernel = convolution with the kernel; depthwise via groups.
    w = jnp.asarray(np.ascontiguousarray(k2[::-1, ::-1]), dtype=x.dtype)
    w = jnp.tile(w[:, :, None, None], (1, 1, 1, c))
    # lhs_dilation inserts up - 1 zeros *between* pixels; the up - 1 after the last one go into pad1.
    pads = [(pad0, pad1 + up - 1)] * 2
    return conv_general_dilated(
        x, w, window_strides=(down, down), padding=pads, lhs_dilation=(up, up),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def upsample_2d(x: jax.Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> jax.Array:
    """FIR upsampling by ``factor`` (constant images stay constant)."""
    k2 = fir_kernel_2d(k) * factor ** 2
    p = k2.shape[0] - factor
    return upfirdn_2d(x, k2, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x: jax.Array, k: Sequence[float] = (1, 3, 3, 1), factor: int = 2) -> jax.Array:
    """FIR downsampling by ``factor`` (anti-aliased average)."""
    k2 = fir_kernel_2d(k)
    p = k2.shape[0] - factor
    return upfirdn_2d(x, k2, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def upsample_conv_2d(x: jax.Array, w: jax.Array, k: Sequence[float] = (1, 3, 3, 1),
                     factor: int = 2) -> jax.Array:
    """Stride-``factor`` transposed convolution with ``w`` (HWIO, r x r) followed by the FIR filter."""
    r = w.shape[0]
    k2 = fir_kernel_2d(k) * factor ** 2
    p = (k2.shape[0] - factor) - (r - 1)
    # transposed conv = correlation of the zero-inserted input, fully padded, with w
    y = conv_general_dilated(
        x, w.astype(x.dtype), window_strides=(1, 1), padding=[(r - 1, r - 1)] * 2,
        lhs_dilation=(factor, factor), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return upfirdn_2d(y, k2, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)


def conv_downsample_2d(x: jax.Array, w: jax.Array, k: Sequence[float] = (1, 3, 3, 1),
                       factor: int = 2) -> jax.Array:
    """FIR filter, then an r x r convolution with ``w`` (HWIO) at stride ``factor``."""
    r = w.shape[0]
    k2 = fir_kernel_2d(k)
    p = (k2.shape[0] - factor) + (r - 1)
    y = upfirdn_2d(x, k2, pad0=(p + 1) // 2, pad1=p // 2)
    return conv_general_dilated(
        y, w.astype(x.dtype), window_strides=(factor, factor), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------- basic layers
def num_groups(channels: int) -> int:
    """score_sde's group count min(C // 4, 32), at least 1."""
    return max(min(channels // 4, 32), 1)


def group_norm(x: jax.Array, dtype: Dtype) -> jax.Array:
    return nn.GroupNorm(num_groups=num_groups(x.shape[-1]), epsilon=1e-6, dtype=dtype)(x)


def conv3x3(x: jax.Array, features: int, init_scale: float = 1.0, dtype: Dtype = jnp.float32,
            stride: int = 1, padding: Any = "SAME") -> jax.Array:
    return nn.Conv(features, kernel_size=(3, 3), strides=(stride, stride), padding=padding, dtype=dtype,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_general_dilated)(x)


def conv1x1(x: jax.Array, features: int, init_scale: float = 1.0, dtype: Dtype = jnp.float32) -> jax.Array:
    return nn.Conv(features, kernel_size=(1, 1), padding="SAME", dtype=dtype,
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated=conv_general_dilated)(x)


class NIN(nn.Module):
    """Per-pixel linear map y = x W + b (parameters ``W`` (C_in, C_out) and ``b``)."""
    num_units: int
    init_scale: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return jnp.dot(x, w.astype(self.dtype)) + b.astype(self.dtype)


class GaussianFourierProjection(nn.Module):
    """[sin(2 pi s W), cos(2 pi s W)] with frozen W ~ N(0, scale^2) (size ``embedding_size``)."""
    embedding_size: int = 256
    scale: float = 16.0

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        w = jax.lax.stop_gradient(self.param("W", nn.initializers.normal(stddev=self.scale),
                                             (self.embedding_size,)))
        proj = s.astype(jnp.float32)[:, None] * w[None, :] * (2 * jnp.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class Conv2d(nn.Module):
    """r x r convolution with optional fused FIR up/downsampling (parameters ``weight`` HWIO, ``bias``)."""
    fmaps: int
    kernel: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", default_init(), (self.kernel, self.kernel, x.shape[-1], self.fmaps))
        if self.up:
            y = upsample_conv_2d(x, w, self.resample_kernel)
        elif self.down:
            y = conv_downsample_2d(x, w, self.resample_kernel)
        else:
            y = conv_general_dilated(x, w.astype(x.dtype), (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b = self.param("bias", nn.initializers.zeros, (self.fmaps,))
        return y + b.astype(y.dtype)


class Combine(nn.Module):
    """Merge a pyramid image x into features y: cat([conv1x1(x), y]) or conv1x1(x) + y."""
    method: str = "cat"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        h = conv1x1(x, y.shape[-1], dtype=self.dtype)
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"progressive_combine must be 'cat' or 'sum', got {self.method!r}")


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all positions: x + NIN_3(softmax(q k^T / sqrt C) v)."""
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = group_norm(x, self.dtype)
        q, k, v = (NIN(c, dtype=self.dtype)(h).reshape(b, hgt * wid, c) for _ in range(3))
        logits = jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bnm,bmc->bnc", weights, v).reshape(b, hgt, wid, c)
        h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(h)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class Upsample(nn.Module):
    """2x upsampling: FIR (optionally fused with a 3x3 conv) or nearest (optionally then a 3x3 conv)."""
    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    pyramid: bool = False    # a pyramid resampler (bookkeeping only: the PyTorch port does not list it
                             # among its layers when it has no conv)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            h = naive_upsample_2d(x)
            return conv3x3(h, out_ch, dtype=self.dtype) if self.with_conv else h
        if not self.with_conv:
            return upsample_2d(x, self.fir_kernel)
        return Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel, dtype=self.dtype)(x)


class Downsample(nn.Module):
    """2x downsampling: FIR (optionally fused with a 3x3 conv) or average pool / strided 3x3 conv."""
    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    pyramid: bool = False    # a pyramid resampler (bookkeeping only: the PyTorch port does not list it
                             # among its layers when it has no conv)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            if self.with_conv:       # pad bottom/right by one, 3x3 conv at stride 2
                return conv3x3(x, out_ch, dtype=self.dtype, stride=2, padding=((0, 1), (0, 1)))
            return naive_downsample_2d(x)
        if not self.with_conv:
            return downsample_2d(x, self.fir_kernel)
        return Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel, dtype=self.dtype)(x)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block: GN-act-conv (+ Dense(act(temb))) GN-act-dropout-conv, skip via NIN_0 / Conv_2."""
    act: Callable[[jax.Array], jax.Array] = nn.silu
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array], train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = conv3x3(self.act(group_norm(x, self.dtype)), out_ch, dtype=self.dtype)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(h, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch:
            x = conv3x3(x, out_ch, dtype=self.dtype) if self.conv_shortcut else NIN(out_ch, dtype=self.dtype)(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block that may also resample (FIR or naive) both paths; 1x1 skip conv Conv_2
    when the shape changes."""
    act: Callable[[jax.Array], jax.Array] = nn.silu
    up: bool = False
    down: bool = False
    out_ch: Optional[int] = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array], train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(x, self.dtype))
        if self.up:
            resample = (lambda z: upsample_2d(z, self.fir_kernel)) if self.fir else naive_upsample_2d
            h, x = resample(h), resample(x)
        elif self.down:
            resample = (lambda z: downsample_2d(z, self.fir_kernel)) if self.fir else naive_downsample_2d
            h, x = resample(h), resample(x)
        h = conv3x3(h, out_ch, dtype=self.dtype)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(self.act(temb))[:, None, None, :]
        h = self.act(group_norm(h, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(h, out_ch, init_scale=self.init_scale, dtype=self.dtype)
        if c != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch, dtype=self.dtype)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h
