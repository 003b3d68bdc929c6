"""DDPM++ U-Net (score_sde's ``NCSNpp`` with the DDPM++ settings) in Flax linen.

The fixed choices are those of ``configs/vp/cifar10_ddpmpp_continuous.py``: BigGAN
residual blocks that also do the resampling (nearest-neighbour up, average-pool down,
no FIR), skip rescaling by 1/sqrt(2), sinusoidal noise-level embedding, no progressive
input/output pyramids, near-zero init of each block's last layer.

The network is a plain conditional image-to-image map: it knows nothing of diffusion
families, noise schedules or preconditioning; the caller chooses what scalar to feed as
``t_embed_input`` and how to interpret the output.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (AttnBlockpp, ResnetBlockBigGAN, conv3x3, default_init,
                                         get_timestep_embedding, group_norm)


class DDPMpp(nn.Module):
    """DDPM++ U-Net.

    Attributes:
      in_channels: channels of the input ``x`` (e.g. ``k * C`` for a k-coordinate
        phase-space family on C-channel images).
      out_channels: channels of the output.
      nf: base width; level ``i`` has ``nf * ch_mult[i]`` channels.
      ch_mult: width multipliers, one per resolution level (each level but the last halves
        the resolution).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (height) at which self-attention is applied.
      dropout: dropout rate inside residual blocks (active only with ``train=True``).
      dtype: compute dtype of activations; parameters stay float32 and the output is
        returned as float32.

    CIFAR-10 DDPM++ (cont.) is the default; CelebA-HQ 256 uses
    ``ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2``.
    """
    in_channels: int
    out_channels: int
    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    dtype: Any = jnp.float32

    def _check_inputs(self, x: jax.Array, t_embed_input: jax.Array) -> None:
        """Fail early, at trace time, with a message that names the fix."""
        if x.ndim != 4:
            raise ValueError(f"DDPMpp expects NHWC input of rank 4, got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"DDPMpp was built for in_channels={self.in_channels} but x has "
                             f"{x.shape[-1]} channels (shape {x.shape}); x must be NHWC")
        factor = 2 ** (len(self.ch_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"resolution {x.shape[1]}x{x.shape[2]} must be divisible by "
                             f"2**(len(ch_mult)-1) = {factor} for ch_mult={tuple(self.ch_mult)}")
        if t_embed_input.shape != (x.shape[0],):
            raise ValueError(f"t_embed_input must have shape (batch,) = ({x.shape[0]},), "
                             f"got {t_embed_input.shape}")

    @nn.compact
    def __call__(self, x: jax.Array, t_embed_input: jax.Array, train: bool) -> jax.Array:
        """Map ``x`` (N, H, W, in_channels) conditioned on ``t_embed_input`` (N,) to
        (N, H, W, out_channels) float32."""
        t_embed_input = jnp.asarray(t_embed_input)
        self._check_inputs(x, t_embed_input)
        num_levels = len(self.ch_mult)
        block = functools.partial(ResnetBlockBigGAN, dropout=self.dropout, dtype=self.dtype)
        attn = functools.partial(AttnBlockpp, dtype=self.dtype)

        # Noise-level embedding, shared by every residual block.
        temb = get_timestep_embedding(t_embed_input, self.nf)
        temb = nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=self.dtype)(temb)
        temb = nn.Dense(4 * self.nf, kernel_init=default_init(), dtype=self.dtype)(nn.silu(temb))

        # Down path: keep every intermediate for the skip connections.
        hs = [conv3x3(x.astype(self.dtype), self.nf, dtype=self.dtype)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = block(out_ch=self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level != num_levels - 1:
                hs.append(block(down=True)(hs[-1], temb, train))

        # Bottleneck: always attended, whatever attn_resolutions says.
        h = block()(hs[-1], temb, train)
        h = attn()(h)
        h = block()(h, temb, train)

        # Up path: one extra block per level consumes the level's downsampling output.
        for level in reversed(range(num_levels)):
            for _ in range(self.num_res_blocks + 1):
                h = block(out_ch=self.nf * self.ch_mult[level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = attn()(h)
            if level != 0:
                h = block(up=True)(h, temb, train)
        assert not hs, "every skip connection must be consumed"

        h = nn.silu(group_norm(h, self.dtype))
        # Near-zero init: the untrained network outputs ~0.
        h = conv3x3(h, self.out_channels, init_scale=0.0, dtype=self.dtype)
        return h.astype(jnp.float32)
