"""CelebA-HQ 256, CD-HOLD n=3, DDPM++ 256 layout."""
from diffusion_jax.training.configs import celebahq256


def get_config():
    return celebahq256("cdhold3")
