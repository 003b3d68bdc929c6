"""scikit-learn 8x8 digits (embedded, offline), cdhold3, small DDPM++."""
from diffusion_jax.training.configs import digits


def get_config():
    return digits("cdhold3")
