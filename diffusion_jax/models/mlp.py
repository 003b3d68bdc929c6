"""Time-conditioned residual MLP for low-dimensional (toy) data."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import get_timestep_embedding


class MLP(nn.Module):
    """Residual MLP ``(x, t_embed_input) -> output`` for flat data.

    The scalar ``t_embed_input`` is embedded sinusoidally, passed through a small MLP and
    added inside every residual block. The output layer starts at zero so the untrained
    network predicts 0.

    Attributes:
      out_dim: output width.
      hidden: width of the hidden layers.
      depth: number of residual blocks.
      time_embed_dim: width of the sinusoidal embedding.
      dtype: compute dtype (parameters stay float32, output is float32).
    """
    out_dim: int
    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t_embed_input: jax.Array, train: bool = False) -> jax.Array:
        """Map ``x`` of shape (batch, d_in) and ``t_embed_input`` of shape (batch,) to
        (batch, out_dim) float32. ``train`` is accepted for interface parity (no dropout)."""
        t_embed_input = jnp.asarray(t_embed_input)
        if x.ndim != 2:
            raise ValueError(f"MLP expects flat input of shape (batch, d_in), got {x.shape}")
        if t_embed_input.shape != (x.shape[0],):
            raise ValueError(f"t_embed_input must have shape (batch,) = ({x.shape[0]},), "
                             f"got {t_embed_input.shape}")
        dense = lambda n, **kw: nn.Dense(n, dtype=self.dtype, **kw)

        temb = get_timestep_embedding(t_embed_input, self.time_embed_dim)
        temb = dense(self.hidden)(nn.silu(dense(self.hidden)(temb)))

        h = dense(self.hidden)(x.astype(self.dtype))
        for _ in range(self.depth):
            # Pre-activation residual block with an additive time bias.
            r = dense(self.hidden)(nn.silu(h)) + dense(self.hidden)(nn.silu(temb))
            h = h + dense(self.hidden)(nn.silu(r))
        out = dense(self.out_dim, kernel_init=nn.initializers.zeros)(nn.silu(h))
        return out.astype(jnp.float32)
