"""Toy 2-D checkerboard, psld."""
from diffusion_jax.training.configs import toy2d


def get_config():
    return toy2d("psld")
