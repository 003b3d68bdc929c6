"""CelebA-HQ 256, CLD: CLD-SGM's CelebA-HQ 256 setting (nv-tlabs/CLD-SGM, configs/default_celeba_paper.txt
+ specific_celeba_paper.txt).

Matches: NCSN++ code in its DDPM++ setting (nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2), 2 blocks, attention at
16, BigGAN blocks, skip rescale, no FIR, no pyramids, positional embedding, dropout 0.1); CLD beta 4, M^-1
4, gamma 0.04; HSM, mixed score, K = L; Adam 1e-4, warm-up 100k steps, clip 1, EMA 0.9999, batch 64,
320k steps.

Deliberate differences: the network predicts eps for x and v (6 output channels) where CLD-SGM's predicts
the scaled velocity score (3); the positional embedding gets 1000 t where CLD-SGM feeds t itself; the
input is scaled per coordinate by c_in.
"""
from diffusion_jax.training.configs import celebahq256_ncsnpp


def get_config():
    c = celebahq256_ncsnpp("cld", beta=4.0, m_inv=4.0, init_gamma=0.04)
    c.model.mixed_score = True
    c.model.K = "L"
    c.training.objective = "hsm"
    c.optim.warmup = 100_000
    return c
