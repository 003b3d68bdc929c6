"""scikit-learn 8x8 digits (embedded, offline), cld, small DDPM++."""
from diffusion_jax.training.configs import digits


def get_config():
    return digits("cld")
