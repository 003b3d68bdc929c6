"""Linear phase-space diffusion families on one core: ``make(name, **params)``.

:class:`Family` (``sdes.base``) is the interface generic code depends on; :class:`LinearSDE` (one k x k
process shared by every pixel) and :class:`ModalSDE` (scalar laws per mode of an orthogonal basis) implement it.
"""
from diffusion_jax.sdes.base import Family, FamilyBase
from diffusion_jax.sdes.families import FAMILIES, bdm, cdhold, critical_damping, cld, hold, make, psld, told, ve, vp
from diffusion_jax.sdes.linear import LinearSDE, apply_matrix
from diffusion_jax.sdes.modal import DCTBasis, ModalSDE, dct_matrix
from diffusion_jax.sdes.schedules import ConstantBeta, GeometricSigma, LinearBeta

__all__ = ["Family", "FamilyBase", "FAMILIES", "LinearSDE", "apply_matrix", "make", "vp", "ve", "cld", "hold",
           "cdhold", "told", "psld", "bdm", "ModalSDE", "DCTBasis", "dct_matrix", "critical_damping", "ConstantBeta",
           "LinearBeta", "GeometricSigma"]
