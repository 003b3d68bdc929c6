"""Score / denoiser networks: ``get_model(name, **kwargs)``.

The networks only map ``(x, t_embed_input, train)`` to an output; they know nothing
about diffusion families or preconditioning.
"""
from typing import Any, Callable, Dict

import flax.linen as nn

from diffusion_jax.models.ddpmpp import DDPMpp
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.ncsnpp import NCSNpp

MODELS: Dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "ddpmpp": DDPMpp, "ncsnpp": NCSNpp}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network called ``name`` ("mlp", "ddpmpp" or "ncsnpp") with ``kwargs`` as its fields."""
    try:
        cls = MODELS[name.lower()]
    except KeyError as e:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from e
    return cls(**kwargs)


__all__ = ["MLP", "DDPMpp", "NCSNpp", "MODELS", "get_model"]
