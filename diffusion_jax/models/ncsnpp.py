r"""NCSN++ U-Net (Song et al. 2021, score_sde's ``NCSNpp`` with all its options) in Flax linen.

Structure (``L = len(ch_mult)`` levels, level i at resolution H / 2^i with ``nf * ch_mult[i]`` channels)::

    temb = Dense(act(Dense(embed(c_noise))))         embed: Fourier features (scale ``fourier_scale``)
                                                      of c_noise, or sinusoidal positional of c_noise
    down:  conv3x3 -> per level: num_res_blocks x [ResBlock (+ attention at attn_resolutions)]
                      and (but the last level) a downsampling ResBlock (biggan) / Downsample (ddpm),
                      with the input pyramid: 'input_skip' combines the FIR-downsampled input
                      (Combine: cat / sum of a 1x1 conv), 'residual' adds a FIR-conv-downsampled
                      pyramid (divided by sqrt 2 with skip_rescale)
    mid:   ResBlock, attention, ResBlock
    up:    per level (last first): num_res_blocks + 1 ResBlocks on [h, skip], attention,
           output pyramid ('output_skip': sum of FIR-upsampled GN-act-conv3x3 images, 'residual':
           FIR-conv-upsampled features added to h), upsampling ResBlock / Upsample (but level 0)
    out:   GN-act-conv3x3 (or the output_skip pyramid)

score_sde's CIFAR-10 NCSN++ (cont.): nf 128, ch_mult (1, 2, 2, 2), 4 blocks (8 for "deep"), attention
at 16, FIR (1, 3, 3, 1), BigGAN blocks, skip_rescale, progressive 'none', progressive_input
'residual', combine 'sum', Fourier embedding of scale 16, init_scale 0, dropout 0.1. With ``fir=False``,
``progressive_input='none'``, positional embedding, the same class is DDPM++.

The network is family-agnostic: ``net.apply({"params": p}, x, c_noise, train=...)`` maps ``x`` (N, H, W,
in_channels) and the scalar ``c_noise`` (N,) (fed to the embedding as is: score_sde feeds log sigma to
the Fourier embedding and the discrete step to the positional one; the library's preconditioner feeds
its own time feature) to (N, H, W, out_channels) float32. ``in_channels`` feeds the first conv and the
input pyramid, ``out_channels`` the last conv and the output pyramid (k C for a k-state family).
Parameter names are score_sde's (see :mod:`diffusion_jax.models.layerspp`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import default_init, get_timestep_embedding
from diffusion_jax.models.layerspp import (ACTIVATIONS, AttnBlockpp, Combine, Downsample,
                                           GaussianFourierProjection, ResnetBlockBigGANpp,
                                           ResnetBlockDDPMpp, Upsample, conv3x3, group_norm)

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
COMBINE = ("sum", "cat")
EMBEDDINGS = ("fourier", "positional")
RESBLOCKS = ("biggan", "ddpm")


class NCSNpp(nn.Module):
    """NCSN++ (defaults: score_sde's CIFAR-10 NCSN++ (cont.), 4 blocks per level).

    Attributes:
      in_channels / out_channels: channels of ``x`` and of the output.
      nf, ch_mult, num_res_blocks, attn_resolutions, dropout: widths, depth, attention sizes (by
        height), dropout inside residual blocks (only with ``train=True``).
      resblock_type: 'biggan' (resampling inside residual blocks) or 'ddpm' (separate Up/Downsample).
      resamp_with_conv: whether 'ddpm' resampling layers carry a conv.
      fir, fir_kernel: FIR resampling with the separable kernel (else nearest / average pooling).
      skip_rescale: divide residual sums by sqrt(2).
      progressive: output pyramid, one of 'none', 'output_skip', 'residual'.
      progressive_input: input pyramid, one of 'none', 'input_skip', 'residual'.
      progressive_combine: 'sum' or 'cat' (how 'input_skip' merges the pyramid).
      embedding_type: 'fourier' (random features of scale ``fourier_scale``) or 'positional'.
      init_scale: scale of the initialisation of each block's last layer (0: near zero).
      nonlinearity: 'swish' (SiLU), 'relu', 'elu' or 'lrelu'.
      dtype: compute dtype (parameters stay float32; output float32).
    """
    in_channels: int
    out_channels: int
    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resblock_type: str = "biggan"
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    nonlinearity: str = "swish"
    dtype: Any = jnp.float32

    def check_options(self) -> None:
        """Raise ``ValueError`` naming the field for any unknown option (no tracing needed)."""
        for field, value, allowed in (("progressive", self.progressive, PROGRESSIVE),
                                      ("progressive_input", self.progressive_input, PROGRESSIVE_INPUT),
                                      ("progressive_combine", self.progressive_combine, COMBINE),
                                      ("embedding_type", self.embedding_type, EMBEDDINGS),
                                      ("resblock_type", self.resblock_type, RESBLOCKS),
                                      ("nonlinearity", self.nonlinearity, tuple(ACTIVATIONS))):
            if value not in allowed:
                raise ValueError(f"NCSNpp: unknown {field} {value!r} (config.model.kwargs.{field}); "
                                 f"choose one of {allowed}")
        if not (self.in_channels >= 1 and self.out_channels >= 1 and self.nf >= 1 and len(self.ch_mult) >= 1
                and self.num_res_blocks >= 1):
            raise ValueError("NCSNpp needs in_channels, out_channels, nf, num_res_blocks >= 1 and a "
                             "non-empty ch_mult")

    def _check_inputs(self, x: jax.Array, c_noise: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"NCSNpp expects NHWC input of rank 4, got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"NCSNpp was built for in_channels={self.in_channels} but x has "
                             f"{x.shape[-1]} channels (shape {x.shape}); x must be NHWC")
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"resolution {x.shape[1]}x{x.shape[2]} must be divisible by "
                             f"2**(len(ch_mult)-1) = {factor} for ch_mult={tuple(self.ch_mult)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape (batch,) = ({x.shape[0]},), got {c_noise.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, c_noise: jax.Array, train: bool) -> jax.Array:
        self.check_options()
        c_noise = jnp.asarray(c_noise)
        self._check_inputs(x, c_noise)
        act = ACTIVATIONS[self.nonlinearity]
        nf, dt = self.nf, self.dtype
        levels = len(self.ch_mult)
        fir = dict(fir=self.fir, fir_kernel=tuple(self.fir_kernel), dtype=dt)

        if self.embedding_type == "fourier":
            temb = GaussianFourierProjection(embedding_size=nf, scale=self.fourier_scale)(c_noise)
        else:
            temb = get_timestep_embedding(c_noise, nf)
        temb = nn.Dense(4 * nf, kernel_init=default_init(), dtype=dt)(temb)
        temb = nn.Dense(4 * nf, kernel_init=default_init(), dtype=dt)(act(temb))

        attn = functools.partial(AttnBlockpp, init_scale=self.init_scale, skip_rescale=self.skip_rescale,
                                 dtype=dt)
        if self.resblock_type == "biggan":
            res = functools.partial(ResnetBlockBigGANpp, act=act, dropout=self.dropout,
                                    init_scale=self.init_scale, skip_rescale=self.skip_rescale, **fir)
        else:
            res = functools.partial(ResnetBlockDDPMpp, act=act, dropout=self.dropout,
                                    init_scale=self.init_scale, skip_rescale=self.skip_rescale, dtype=dt)

        def block(h, **kw):
            return res(**kw)(h, temb, train)

        def rescaled_sum(a, b):
            return (a + b) / math.sqrt(2.0) if self.skip_rescale else a + b

        x = x.astype(dt)
        pyramid_in = x if self.progressive_input != "none" else None
        hs = [conv3x3(x, nf, dtype=dt)]
        for level in range(levels):
            for _ in range(self.num_res_blocks):
                h = block(hs[-1], out_ch=nf * self.ch_mult[level])
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level == levels - 1:
                continue
            if self.resblock_type == "ddpm":
                h = Downsample(with_conv=self.resamp_with_conv, **fir)(hs[-1])
            else:
                h = block(hs[-1], down=True)
            if self.progressive_input == "input_skip":
                pyramid_in = Downsample(with_conv=False, pyramid=True, **fir)(pyramid_in)
                h = Combine(method=self.progressive_combine, dtype=dt)(pyramid_in, h)
            elif self.progressive_input == "residual":
                pyramid_in = Downsample(out_ch=h.shape[-1], with_conv=True, pyramid=True, **fir)(pyramid_in)
                h = pyramid_in = rescaled_sum(pyramid_in, h)
            hs.append(h)

        h = block(hs[-1])
        h = attn()(h)
        h = block(h)

        pyramid = None
        for level in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), out_ch=nf * self.ch_mult[level])
            if h.shape[1] in self.attn_resolutions:
                h = attn()(h)
            if self.progressive == "output_skip":
                if level != levels - 1:
                    pyramid = Upsample(with_conv=False, pyramid=True, **fir)(pyramid)
                img = conv3x3(act(group_norm(h, dt)), self.out_channels, init_scale=self.init_scale, dtype=dt)
                pyramid = img if pyramid is None else pyramid + img
            elif self.progressive == "residual":
                if level == levels - 1:
                    pyramid = conv3x3(act(group_norm(h, dt)), h.shape[-1], dtype=dt)
                else:
                    pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, pyramid=True, **fir)(pyramid)
                    h = pyramid = rescaled_sum(pyramid, h)
            if level != 0:
                if self.resblock_type == "ddpm":
                    h = Upsample(with_conv=self.resamp_with_conv, **fir)(h)
                else:
                    h = block(h, up=True)
        assert not hs, "every skip connection must be consumed"

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = conv3x3(act(group_norm(h, dt)), self.out_channels, init_scale=self.init_scale, dtype=dt)
        return h.astype(jnp.float32)
