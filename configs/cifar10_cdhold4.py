"""CIFAR-10, cdhold4, DDPM++ (cont.) at paper scale."""
from diffusion_jax.training.configs import cifar10


def get_config():
    return cifar10("cdhold4")
