"""CIFAR-10, PFGM++ with D = 128, EDM settings (sigma in [0.002, 80], EDM preconditioning, Heun NFE 35), DDPM++ (cont.)."""
from diffusion_jax.training.configs import field_model, cifar10


def get_config():
    return field_model(cifar10("pfgmpp", D=128.0))
