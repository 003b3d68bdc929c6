"""CIFAR-10, CD-HOLD n = 5, NCSN++ (deep): the CD-HOLD authors' public code (its CIFAR-10 setting).

Matches: NCSN++ nf 128, ch_mult (1, 2, 2, 2), 8 blocks, attention at 16, FIR (1, 3, 3, 1), BigGAN blocks,
residual input pyramid (sum), Fourier features, dropout 0.1, mixed score; Adam 2e-4, warm-up 5000, clip 1,
EMA 0.9999, 800k steps, batch 128; Euler-Maruyama sampling (order n = 3..6 reported to work on CIFAR-10).

Deliberate differences: the family keeps the library's time scale (beta 4, T = 1, so B(T) = 4) where the
authors integrate to T = 5 in their time units; eps w.r.t. the Cholesky factor K = L_t (for every n: gDDIM's
R_t table did not finish building within minutes on CPU for n = 5, 6); Fourier
features of log t; the input is scaled per coordinate by c_in.
"""
from diffusion_jax.training.configs import cifar10_ncsnpp


def get_config():
    c = cifar10_ncsnpp("cdhold5")
    c.model.mixed_score = True
    c.model.K = "L"
    c.sampling.method = "euler_maruyama"
    c.sampling.nfe = 1000
    return c
