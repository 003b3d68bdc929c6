"""Force-field ODE generative models (docs/maths.md section 6): PFGM++ in the EDM parameterisation.

:mod:`.pfgmpp`: the PFGM++ perturbation kernel (a Student-t with D degrees of freedom at scale sigma, D -> inf
is VE/EDM), its sampler and normalised log-density, the EDM-preconditioned denoiser loss, the empirical
optimal denoiser, an EDM Euler/Heun sampler with exact NFE counts, and a tiny 2-D training demo.
"""
from diffusion_jax.fields.pfgmpp import (ToyResult, denoiser_loss, edm_preconditioning, edm_sigmas,
                                         empirical_denoiser, kernel_log_normaliser, kernel_logpdf,
                                         lognormal_sigma, loss_weight, precondition, prior_sample, sample,
                                         sample_kernel, train_toy)

__all__ = ["sample_kernel", "kernel_logpdf", "kernel_log_normaliser", "prior_sample", "edm_preconditioning",
           "precondition", "loss_weight", "lognormal_sigma", "denoiser_loss", "empirical_denoiser", "edm_sigmas",
           "sample", "ToyResult", "train_toy"]
