r"""CLD-SGM checkpoints (Dockhorn, Vahdat & Kreis 2022, github.com/nv-tlabs/CLD-SGM): NCSN++ with CLD.

**File** (``util/checkpoint.save_checkpoint``): ``torch.save({'optimizer', 'model', 'ema', 'step'})`` where
``model`` is the state dict of ``DDP(NCSNpp)`` (keys ``module.all_modules.<i>.*``, no buffers) and ``ema`` is
``{'decay', 'num_updates', 'shadow_params'}`` (trainable parameters in ``model.parameters()`` order; the
frozen Fourier ``W`` is not averaged). The same layout as score_sde_pytorch's, read by
:func:`diffusion_jax.interop.score_sde.convert`.

**Network** (models/ncsnpp.py, its own config keys ``n_channels``, ``n_resblocks``, ``use_fir``,
``progressive_combine`` ...): score_sde's NCSN++ whose input is the whole state ``cat([x, v])`` (2 C channels,
raw, data in [-1, 1]) and whose output has C channels (the velocity part only). Time input: ``log t`` for the
Fourier embedding, ``t`` itself for the positional one.

**Parameterisation** (models/utils.py ``get_score_fn``, sde_lib.py ``CLD``): with Sigma^eps = Sigma_t +
numerical_eps I the HSM perturbation covariance (v_0 ~ N(0, gamma M)), ``noise_multiplier`` = -1 / l22 (l22 of
:func:`~diffusion_jax.interop.langevin.peer_cholesky`) and network output o, the velocity score is

    s_v = -v / S^eps_vv + o * (-1 / l22)       (mixed score, ``mixed_score = true``: CIFAR-10, CelebA-HQ)
    s_v = -o / l22                            (``mixed_score = false``).

So eps_v w.r.t. L^eps is eps_v = -l22 s_v = o + l22 v / S^eps_vv (mixed). CLD-SGM has no position score: its
samplers and likelihood use s only through G G^T s = (0, 2 Gamma beta s_v). The library's eps has both
coordinates; the position part is completed so that the implied denoiser is one x_0 for both coordinates
(CLD-SGM's own ``get_x0_prediction``): with z = L^{eps,-1} u and w = L^{eps,-1} m_t (m_t the mean
coefficients), u = m_t x_0 + L^eps eps gives

    x0_hat = (z_v - eps_v) / w_v,      eps_x = z_x - w_x x0_hat,

and eps_K = K^T L^{eps,-T} (eps_x, eps_v). The library's score s = -K^{-T} eps_K then has s_v equal to CLD-SGM's
score, and every sampler that uses the score through G G^T (Euler-Maruyama, the probability flow, gDDIM with
K = L, bpd) sees exactly CLD-SGM's model. The completion also makes u = m_t x0_hat + K_t eps_K exact, which
gDDIM's float32 step assumes (it drops the part of u that the denoiser and eps do not explain).

**Family**: CLD-SGM's ``beta0 + beta1 t`` with beta1 = 0 (every published run) is the library's ``cld`` with
beta = beta0, M^-1 = m_inv, critical friction Gamma = 2 / sqrt(m_inv) and ``init_gamma`` = gamma (v_0 ~
N(0, gamma M)); T = 1. ``numerical_eps`` is not in the file: its configs use 1e-9 for CIFAR-10 and 1e-6
for CelebA-HQ 256 (:func:`default_numerical_eps`; ``import-checkpoint --numerical-eps`` overrides it; it is kept
as ``config.model.peer_numerical_eps``). DSM-trained models (v_0 = 0) have no library counterpart
(init_gamma > 0) and are not supported.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax.numpy as jnp

from diffusion_jax.interop import langevin
from diffusion_jax.interop.score_sde import convert as _convert_run_lib

Array = Any
NUMERICAL_EPS = {"cifar10": 1e-9, "celeb_a_hq": 1e-6}     # configs/specific_{cifar10,celeba_paper}.txt
PUBLISHED = ("CLD-SGM's checkpoints (checkpoint_<n>.pth, e.g. checkpoint_800000.pth for CIFAR-10), linked from "
             "the 'Checkpoints' section of the README of github.com/nv-tlabs/CLD-SGM (Google Drive)")


class CldSgmPreconditioner:
    """eps(u, t) w.r.t. K_t of a CLD-SGM network (velocity score, optionally mixed)."""

    def __init__(self, sde: Any, sqrt: Any, embedding_type: str = "fourier", mixed: bool = True,
                 numerical_eps: float = 1e-9):
        check_family(sde)
        self.sde, self.sqrt = sde, sqrt
        self.embedding_type, self.mixed, self.numerical_eps = embedding_type, bool(mixed), float(numerical_eps)

    @staticmethod
    def network_channels(data_shape: tuple[int, ...], order: int) -> tuple[int, int]:
        """(input, output) channels of CLD-SGM's NCSN++: [x, v] in, the velocity part out."""
        return data_shape[-1] * order, data_shape[-1]

    to_network = staticmethod(langevin.to_blocks)

    def eps(self, net: Any, u: Array, t: Array, **net_kwargs: Any) -> Array:
        t = jnp.asarray(t, u.dtype)
        out = net(self.to_network(u), langevin.time_feature(t, self.embedding_type), **net_kwargs)
        out = out.astype(u.dtype).reshape(u.shape[:-1])
        cov = self.sde.covariance(t)
        l11, l21, l22 = langevin.peer_cholesky(cov, self.numerical_eps)
        col = lambda a: a.reshape(a.shape + (1,) * (u.ndim - 2))  # noqa: E731  (batch,) -> (batch, 1, 1, 1)
        x, v = u[..., 0], u[..., 1]
        eps_v = out + col(l22 / (cov[..., 1, 1] + self.numerical_eps)) * v if self.mixed else out
        # whitened state and mean: z = L^-1 u, w = L^-1 m
        z_x = x / col(l11)
        z_v = (v - col(l21) * z_x) / col(l22)
        m = self.sde.mean_coefficient(t)
        w_x = m[..., 0] / l11
        w_v = (m[..., 1] - l21 * w_x) / l22
        eps_x = z_x - col(w_x / w_v) * (z_v - eps_v)
        eps_l = jnp.stack([eps_x, eps_v], -1)
        return langevin.eps_in_library_basis(self.sde, self.sqrt(t), langevin.lower(l11, l21, l22), eps_l)


def check_family(sde: Any) -> None:
    """CLD-SGM's SDE is the library's ``cld`` at critical damping."""
    if sde.name != "cld":
        raise ValueError(f"CLD-SGM checkpoints need config.family.name='cld' (CLD-SGM's SDE), got {sde.name!r}")
    p = sde.params
    if not math.isclose(p["gamma"], 2.0 / math.sqrt(p["m_inv"]), rel_tol=1e-12):
        raise ValueError(f"CLD-SGM uses critical damping Gamma = 2 / sqrt(m_inv) = {2 / math.sqrt(p['m_inv']):g}; "
                         f"config.family.params.gamma={p['gamma']!r}: leave gamma unset")


def check_config(config: Any) -> None:
    kw = config.model.kwargs
    if kw.get("embedding_type", "fourier") not in ("fourier", "positional"):
        raise ValueError(f"unknown embedding_type {kw.get('embedding_type')!r}")


def default_numerical_eps(config: Any) -> float:
    """CLD-SGM's ``numerical_eps`` of the published setting for the config's data set (1e-9 otherwise)."""
    return NUMERICAL_EPS.get(config.data.dataset, 1e-9)


def make_preconditioner(sde: Any, sqrt: Any, model: Any) -> CldSgmPreconditioner:
    return CldSgmPreconditioner(sde, sqrt, embedding_type=model.kwargs.get("embedding_type", "fourier"),
                                mixed=bool(model.get("mixed_score", True)),
                                numerical_eps=float(model.get("peer_numerical_eps", 1e-9)))


def convert(obj: Any, net: Any, image_shape: tuple[int, int], path: str) -> tuple[dict, dict, float, int]:
    """(params, EMA params, EMA rate, step) from a loaded CLD-SGM checkpoint object."""
    return _convert_run_lib(obj, net, image_shape, path, peer="CLD-SGM")


def check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLD-SGM checkpoint {path} not found: expected a file such as "
                                f"checkpoint_800000.pth from {PUBLISHED}; nothing is downloaded")
