"""CelebA-HQ 256, CD-HOLD n = 3, on the NCSN++ 256 layout of CLD-SGM's CelebA-HQ run.

Network and optimiser as configs/celebahq256_cld.py (NCSN++ code in its DDPM++ setting: nf 128, ch_mult
(1, 1, 2, 2, 2, 2, 2), 2 blocks, attention at 16, BigGAN blocks, no FIR, no pyramids, positional embedding,
dropout 0.1; Adam 1e-4, clip 1, EMA 0.9999, batch 64, 320k steps), with the mixed score.

Deliberate differences: no published CD-HOLD CelebA-HQ 256 run exists to match, so the family keeps the
library's CD-HOLD defaults (beta 4, T = 1, initial auxiliary variances 0.04); K = R_t; positional embedding
of 1000 t.
"""
from diffusion_jax.training.configs import celebahq256_ncsnpp


def get_config():
    c = celebahq256_ncsnpp("cdhold3")
    c.model.mixed_score = True
    return c
