"""scikit-learn 8x8 digits, radial-CDF field Psi = tanh, small DDPM++."""
from diffusion_jax.training.configs import field_model, digits


def get_config():
    return field_model(digits("radial_tanh"))
