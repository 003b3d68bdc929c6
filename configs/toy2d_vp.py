"""Toy 2-D checkerboard, vp."""
from diffusion_jax.configs import toy2d


def get_config():
    return toy2d("vp")
