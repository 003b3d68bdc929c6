"""Toy 2-D checkerboard, cdhold4."""
from diffusion_jax.configs import toy2d


def get_config():
    return toy2d("cdhold4")
