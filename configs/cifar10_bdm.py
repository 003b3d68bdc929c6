"""CIFAR-10, blurring diffusion (Hoogeboom & Salimans' sigma_blur_max = 20, d_min = 0.001), DDPM++."""
from diffusion_jax.configs import cifar10


def get_config():
    return cifar10("bdm", shape=(32, 32, 3), sigma_blur_max=20.0, d_min=0.001)
