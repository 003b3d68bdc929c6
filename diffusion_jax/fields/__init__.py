"""Force-field ODE generative models (docs/maths.md section 6): perturbation kernels, their checks, and PFGM++ in the EDM parameterisation.

:mod:`.kernels`: the kernel interface (sample, log-density, conditional velocity, prior, noise-level
alignment, exact empirical field) and the kernels Gaussian (VE), Cauchy (PFGM), Student-t (PFGM++) and the
radial-CDF family (tanh, exponential, user CDF). :mod:`.checks`: numerical checks of the defining conditions
(continuity equation, normalisation, delta limit, prior independent of the data, KS of the radius law).
:mod:`.family`: field models as families (the VE core with a kernel's training noise and prior) for
``training.train`` and ``samplers.sample``; ``families.make("pfgmpp", D=...)``, "pfgm", "radial_tanh", "radial_exp".
:mod:`.pfgmpp`: PFGM++-named entry points (kernel with explicit D, EDM preconditioning and loss, empirical
optimal denoiser, EDM noise grid).
"""
from diffusion_jax.fields import checks, kernels
from diffusion_jax.fields.kernels import (Gaussian, Kernel, RadialCDF, StudentT, make_kernel, pfgm, radial_exp,
                                          radial_tanh)
from diffusion_jax.fields.family import FieldFamily, empirical_denoiser_fn, field_family
from diffusion_jax.fields.pfgmpp import (denoiser_loss, edm_preconditioning, edm_sigmas, empirical_denoiser,
                                         kernel_log_normaliser, kernel_logpdf, lognormal_sigma, loss_weight,
                                         precondition, prior_sample, sample_kernel)

__all__ = ["kernels", "checks", "Kernel", "Gaussian", "StudentT", "RadialCDF", "pfgm", "radial_tanh", "radial_exp",
           "make_kernel", "FieldFamily", "field_family", "empirical_denoiser_fn",
           "sample_kernel", "kernel_logpdf", "kernel_log_normaliser", "prior_sample", "edm_preconditioning",
           "precondition", "loss_weight", "lognormal_sigma", "denoiser_loss", "empirical_denoiser", "edm_sigmas"]
