"""Toy 2-D checkerboard, cdhold3."""
from diffusion_jax.training.configs import toy2d


def get_config():
    return toy2d("cdhold3")
