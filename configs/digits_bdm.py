"""scikit-learn 8x8 digits (embedded, offline), blurring diffusion (bdm), small DDPM++.

Mixed score with the scaled residual (c_out): with plain eps prediction the denoiser implied in blurred
modes is divided by a_f ~ d_min alpha_t and gDDIM at NFE 10 scored fd-pixels 5.39 instead of 0.147
(measured, see the README's bdm section).
"""
from diffusion_jax.training.configs import digits


def get_config():
    # sigma_blur_max in pixels: Hoogeboom & Salimans' 20 at 32 px, scaled to 8 px
    c = digits("bdm", shape=(8, 8, 1), sigma_blur_max=5.0, d_min=0.001)
    c.model.mixed_score = True
    c.model.c_out = True
    return c
