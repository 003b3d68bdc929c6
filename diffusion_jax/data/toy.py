"""Toy 2-D data sets generated in JAX (pure functions of a PRNG key)."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.exact import GaussianMixture, ring_of_gaussians

Array = Any


def checkerboard(key: Array, n: int) -> Array:
    """Uniform on the 8 dark squares of a 4x4 checkerboard on [-2, 2]^2."""
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,)) - 2.0 * jax.random.randint(k3, (n,), 0, 2)
    x2 = x2 + jnp.mod(jnp.floor(x1), 2.0)
    return jnp.stack([x1, x2], axis=-1)


def swiss_roll(key: Array, n: int, noise: float = 0.05) -> Array:
    """A 2-D swiss roll t (cos t, sin t) / 5, t in [1.5 pi, 4.5 pi], plus Gaussian noise."""
    k1, k2 = jax.random.split(key)
    t = 1.5 * math.pi * (1.0 + 2.0 * jax.random.uniform(k1, (n,)))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=-1) / 5.0
    return x + noise * jax.random.normal(k2, x.shape)


def ring8_mixture() -> GaussianMixture:
    """Eight Gaussians (variance 0.01) on a circle of radius 1.5: a known density, exact scores."""
    return ring_of_gaussians(8, radius=1.5, variance=0.01)


def gmm_mixture() -> GaussianMixture:
    """Five isotropic Gaussians of different widths and weights at fixed positions."""
    means = np.array([[-1.5, -1.0], [1.5, -1.2], [0.0, 1.5], [0.3, -0.2], [-1.2, 1.0]])
    return GaussianMixture.create(means, np.array([0.05, 0.02, 0.08, 0.01, 0.03]),
                                  np.array([0.3, 0.2, 0.2, 0.15, 0.15]))


def _mixture_sampler(factory: Callable[[], GaussianMixture]) -> Callable[[Array, int], Array]:
    def draw(key: Array, n: int) -> Array:
        return factory().sample(key, n)
    return draw


TOY_SAMPLERS: dict[str, Callable[[Array, int], Array]] = {
    "checkerboard": checkerboard, "swiss_roll": swiss_roll,
    "ring8": _mixture_sampler(ring8_mixture), "gmm": _mixture_sampler(gmm_mixture),
}
# The mixtures have exact densities (and scores for every family, see diffusion_jax.exact).
TOY_MIXTURES: dict[str, Callable[[], GaussianMixture]] = {"ring8": ring8_mixture, "gmm": gmm_mixture}


def toy_sample(name: str, key: Array, n: int) -> Array:
    if name not in TOY_SAMPLERS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {sorted(TOY_SAMPLERS)}")
    return TOY_SAMPLERS[name](key, n)
