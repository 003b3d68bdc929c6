"""scikit-learn 8x8 digits, PFGM++ with D = 128, small DDPM++."""
from diffusion_jax.training.configs import field_model, digits


def get_config():
    return field_model(digits("pfgmpp", D=128.0))
