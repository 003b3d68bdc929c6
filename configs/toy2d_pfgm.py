"""Toy 2-D checkerboard, PFGM (Cauchy kernel in N+1 dims)."""
from diffusion_jax.training.configs import field_model, toy2d


def get_config():
    return field_model(toy2d("pfgm"))
