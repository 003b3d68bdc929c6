"""CIFAR-10, CD-HOLD n = 3, NCSN++ (deep): the CD-HOLD authors' CIFAR-10 setting; matches and deliberate
differences in :func:`diffusion_jax.training.configs.cifar10_cdhold_ncsnpp`."""
from diffusion_jax.training.configs import cifar10_cdhold_ncsnpp


def get_config():
    return cifar10_cdhold_ncsnpp(3)
