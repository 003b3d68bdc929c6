"""scikit-learn 8x8 digits (embedded, offline), blurring diffusion (bdm), small DDPM++."""
from diffusion_jax.configs import digits


def get_config():
    # sigma_blur_max in pixels: Hoogeboom & Salimans' 20 at 32 px, scaled to 8 px
    return digits("bdm", shape=(8, 8, 1), sigma_blur_max=5.0, d_min=0.001)
