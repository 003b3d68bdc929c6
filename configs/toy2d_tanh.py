"""Toy 2-D checkerboard, radial-CDF field Psi = tanh (second moment aligned with VE)."""
from diffusion_jax.training.configs import field_model, toy2d


def get_config():
    return field_model(toy2d("radial_tanh"))
