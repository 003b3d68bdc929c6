"""CIFAR-10, psld, DDPM++ (cont.) at paper scale."""
from diffusion_jax.training.configs import cifar10


def get_config():
    return cifar10("psld")
