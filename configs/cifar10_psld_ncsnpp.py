"""CIFAR-10, PSLD, NCSN++: PSLD's CIFAR-10 state-of-the-art run (mandt-lab/PSLD,
scripts_psld/sota/uncond/cifar10/train_uncond_psld.sh over main/configs/dataset/cifar10/cifar10_psld.yaml).

Matches: NCSN++ nf 128, ch_mult (2, 2, 2), 8 blocks, attention at 16, FIR, BigGAN blocks, skip rescale,
residual input pyramid (sum), Fourier features (scale 16), dropout 0.15, 6 input / 6 output channels; PSLD
with beta 8 (constant), nu 4.01, Gamma 0.01, kappa 0.04 (initial auxiliary variance), M^-1 = (Gamma -
nu)^2 / 4 (critical), T = 1, Cholesky ('lower') decomposition (K = L); HSM; Adam 2e-4 (0.9, 0.999, 1e-8),
warm-up 5000, clip 1, EMA 0.9999, batch 128 (16 per GPU on 8 GPUs), 2500 epochs (~976k steps).

Deliberate differences: the library's eps loss (weighting "eps") instead of PSLD's "fid" weighting of the
score loss; the input is scaled per coordinate by c_in; Fourier features of log t.
"""
from diffusion_jax.training.configs import cifar10_ncsnpp


def get_config():
    c = cifar10_ncsnpp("psld", beta=8.0, gamma=0.01, nu=4.01, init_kappa=0.04)
    c.model.kwargs.ch_mult = (2, 2, 2)
    c.model.kwargs.dropout = 0.15
    c.model.K = "L"
    c.training.objective = "hsm"
    c.training.num_steps = 976_000
    return c
