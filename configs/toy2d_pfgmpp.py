"""Toy 2-D checkerboard, PFGM++ with D = 4 augmented dimensions (D ~ 2N: far from the Gaussian limit)."""
from diffusion_jax.training.configs import field_model, toy2d


def get_config():
    return field_model(toy2d("pfgmpp", D=4.0))
