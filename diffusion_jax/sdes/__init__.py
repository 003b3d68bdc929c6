"""Linear phase-space SDE families on one core: ``make(name, **params)``."""
from diffusion_jax.sdes.families import FAMILIES, bdm, cdhold, critical_damping, cld, hold, make, psld, told, ve, vp
from diffusion_jax.sdes.linear import LinearSDE, apply_matrix
from diffusion_jax.sdes.modal import DCTBasis, ModalSDE, dct_matrix
from diffusion_jax.sdes.schedules import ConstantBeta, GeometricSigma, LinearBeta

__all__ = ["FAMILIES", "LinearSDE", "apply_matrix", "make", "vp", "ve", "cld", "hold", "cdhold", "told",
           "psld", "bdm", "ModalSDE", "DCTBasis", "dct_matrix", "critical_damping", "ConstantBeta", "LinearBeta", "GeometricSigma"]
