"""diffusion_jax: linear phase-space diffusion models in JAX/Flax.

The notebook API::

    from diffusion_jax import make, sample, prior_init
    sde = make("cld")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 64, (2,))
    u, info = sample(sde, fn, u0, method="gddim", nfe=20)
"""
from diffusion_jax.samplers import prior_init, sample, time_grid
from diffusion_jax.sdes import FAMILIES, Family, make

__version__ = "0.1.0"
__all__ = ["make", "sample", "prior_init", "time_grid", "Family", "FAMILIES", "__version__"]
