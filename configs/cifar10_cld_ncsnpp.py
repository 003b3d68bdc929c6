"""CIFAR-10, CLD, NCSN++ (deep): CLD-SGM's CIFAR-10 setting (nv-tlabs/CLD-SGM, configs/default_cifar10.txt
+ specific_cifar10.txt).

Matches: NCSN++ nf 128, ch_mult (1, 2, 2, 2), 8 blocks, attention at 16, FIR (1, 3, 3, 1), BigGAN blocks,
skip rescale, residual input pyramid (sum), Fourier features (scale 16) of log t, dropout 0.1; CLD with
beta 4, M^-1 4, initial velocity variance gamma 0.04, T = 1; HSM, mixed score, Cholesky square root (K = L),
loss times in [1e-5, 1]; Adam 2e-4, warm-up 100k steps, clip 1, EMA 0.9999, batch 128, 800k steps.

Deliberate differences: the network predicts eps for both x and v (6 output channels, trained with the
library's eps loss w.r.t. L_t) where CLD-SGM's predicts the scaled velocity score only (3 channels), so
the last conv has 3 x 128 x 9 + 3 = 3459 more parameters; the input is scaled per coordinate by c_in.
"""
from diffusion_jax.training.configs import cifar10_ncsnpp


def get_config():
    c = cifar10_ncsnpp("cld", beta=4.0, m_inv=4.0, init_gamma=0.04)
    c.model.mixed_score = True
    c.model.K = "L"
    c.training.objective = "hsm"
    c.optim.warmup = 100_000
    return c
