"""Force-field ODE generative models: perturbation kernels, their checks, and PFGM++ in the EDM parameterisation.

:mod:`.kernels`: the kernel interface (sample, log-density, conditional velocity, prior, noise-level
alignment, exact empirical field) and the kernels Gaussian (VE), Cauchy (PFGM), Student-t (PFGM++) and the
radial-CDF family (tanh, exponential, user CDF). :mod:`.checks`: numerical checks of the defining conditions
(continuity equation, normalisation, delta limit, prior independent of the data, KS of the radius law).
:mod:`.pfgmpp`: the PFGM++ perturbation kernel (a Student-t with D degrees of freedom at scale sigma, D -> inf
is VE/EDM), its sampler and normalised log-density, the EDM-preconditioned denoiser loss, the empirical
optimal denoiser, an EDM Euler/Heun sampler with exact NFE counts, and a tiny 2-D training demo.
"""
from diffusion_jax.fields import checks, kernels
from diffusion_jax.fields.kernels import (Gaussian, Kernel, RadialCDF, StudentT, make_kernel, pfgm, radial_exp,
                                          radial_tanh)
from diffusion_jax.fields.pfgmpp import (ToyResult, denoiser_loss, edm_preconditioning, edm_sigmas,
                                         empirical_denoiser, kernel_log_normaliser, kernel_logpdf,
                                         lognormal_sigma, loss_weight, precondition, prior_sample, sample,
                                         sample_kernel, train_toy)

__all__ = ["kernels", "checks", "Kernel", "Gaussian", "StudentT", "RadialCDF", "pfgm", "radial_tanh", "radial_exp",
           "make_kernel",
           "sample_kernel", "kernel_logpdf", "kernel_log_normaliser", "prior_sample", "edm_preconditioning",
           "precondition", "loss_weight", "lognormal_sigma", "denoiser_loss", "empirical_denoiser", "edm_sigmas",
           "sample", "ToyResult", "train_toy"]
