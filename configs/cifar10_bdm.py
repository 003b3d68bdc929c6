"""CIFAR-10, blurring diffusion (Hoogeboom & Salimans' sigma_blur_max = 20, d_min = 0.001), DDPM++,
mixed score with the scaled residual (c_out; see configs/digits_bdm.py for why)."""
from diffusion_jax.training.configs import cifar10


def get_config():
    c = cifar10("bdm", shape=(32, 32, 3), sigma_blur_max=20.0, d_min=0.001)
    c.model.mixed_score = True
    c.model.c_out = True
    return c
