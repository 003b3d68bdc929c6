"""Parameterisation: square roots K_t of Sigma_t, eps/score/denoiser conversions, network preconditioning.

* :mod:`.roots` -- ``SquareRoot`` K_t (``"R"``: gDDIM's, ``"L"``: Cholesky), cached per family value;
* :mod:`.convert` -- eps <-> score <-> denoiser and :class:`Model` (one function seen in every form);
* :mod:`.precond` -- the network's input scaling, noise conditioning and output (mixed score, c_out).
"""
from diffusion_jax.param.convert import (Model, denoiser_from_eps, eps_from_denoiser, eps_from_score,
                                         score_from_eps, with_params)
from diffusion_jax.param.precond import Preconditioner, network_channels
from diffusion_jax.param.roots import OUTPUTS, SQUARE_ROOTS, SquareRoot, square_root

__all__ = ["Model", "SquareRoot", "square_root", "OUTPUTS", "SQUARE_ROOTS", "score_from_eps", "eps_from_score",
           "eps_from_denoiser", "denoiser_from_eps", "with_params", "Preconditioner", "network_channels"]
