"""CIFAR-10, CLD, NCSN++ (deep): gDDIM's CLD model (qsh-zh/gDDIM; Zhang, Tao & Chen 2023).

Matches: NCSN++ as CLD-SGM's (nf 128, ch_mult (1, 2, 2, 2), 8 blocks, attention at 16, FIR, BigGAN
blocks, residual input pyramid, Fourier features, dropout 0.1); CLD beta 4, M^-1 4, gamma 0.04; eps
prediction w.r.t. gDDIM's square root K = R_t, no mixed score; Adam 2e-4, warm-up 5000, clip 1, EMA 0.9999,
batch 128, ~1M steps. Sampling: gDDIM multistep (order 2 at 27 NFE in the paper).

Deliberate differences: Fourier features of log t; the input is scaled per coordinate by c_in.
The network is the released one tensor for tensor, so gDDIM's checkpoint imports with this config
(``import-checkpoint --format gddim``); the imported run keeps gDDIM's own conventions (unscaled input,
time feature log(999 t), eps w.r.t. gDDIM's R_t mapped to the library's K_t).
"""
from diffusion_jax.training.configs import cifar10_ncsnpp


def get_config():
    c = cifar10_ncsnpp("cld", beta=4.0, m_inv=4.0, init_gamma=0.04)
    c.model.mixed_score = False
    c.model.K = "R"
    c.training.num_steps = 1_000_000
    c.sampling.method = "gddim"
    c.sampling.order = 2
    return c
