r"""PSLD checkpoints (Pandey & Mandt 2023, github.com/mandt-lab/PSLD): NCSN++ with phase-space Langevin diffusion.

**File**: a PyTorch Lightning (1.9) ``.ckpt`` of ``SDEWrapper``: ``{'epoch', 'global_step',
'pytorch-lightning_version', 'state_dict', 'loops', 'callbacks', 'optimizer_states', 'lr_schedulers'}``. The
state dict holds two copies of the score network, ``score_fn.all_modules.*`` (trained) and
``ema_score_fn.all_modules.*`` (the EMA network: main/callbacks.py ``EMAWeightUpdate`` averages every parameter
into it after each step, decay ``training.ema_decay``, which the file does not record; the library config's
``ema_rates[0]`` is used as its label). No buffers. ``global_step`` is the step.

**Network** (main/models/score_fn/song_sde/ncsnpp.py): score_sde's NCSN++ on the raw state ``cat([x, m])`` (2 C
channels, data in [-1, 1]) with ``out_ch`` = 2 C outputs in the same [x, m] blocks; time input ``log t``
(Fourier features) or ``t`` (positional embedding).

**Parameterisation** (main/losses.py ``PSLDScoreLoss``, main/models/sde/psld.py ``get_score``): the output is
eps w.r.t. the lower Cholesky factor L^eps of the HSM perturbation covariance plus ``numerical_eps`` I
(``decomp_mode = lower``, m_0 ~ N(0, kappa M), numerical_eps 1e-9 in every published config; not in the
file: ``import-checkpoint --numerical-eps`` overrides it, kept as ``config.model.peer_numerical_eps``):
s = -L^{eps,-T} o. The library's eps w.r.t.
K_t is eps_K = K^T L^{eps,-T} o (:mod:`diffusion_jax.interop.langevin`), so its score equals PSLD's.

**Family**: PSLD's ``beta_min + t (beta_max - beta_min)`` with beta_min = beta_max (every published run) is the
library's ``psld`` with beta, Gamma, nu, critical M^-1 = (Gamma - nu)^2 / 4 and ``init_kappa`` = kappa; T = 1.
Models with Gamma = 0 (PSLD's 'score_m' mode, C outputs, position score set to 0) or ``decomp_mode = upper``
are not supported: the checkpoint does not record the decomposition, and every published PSLD run is
``lower`` with Gamma > 0.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from diffusion_jax.interop import langevin
from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch, ncsnpp_from_torch, report_mismatch

Array = Any
NUMERICAL_EPS = 1e-9                # main/configs/dataset/*/*_psld.yaml
PUBLISHED = ("PSLD's Lightning checkpoints (<name>-epoch=<n>-loss=<x>.ckpt, e.g. the CIFAR-10 SOTA run's "
             "epoch=2349 file), linked from the README of github.com/mandt-lab/PSLD")
PREFIX, EMA_PREFIX = "score_fn.", "ema_score_fn."


class PsldPreconditioner:
    """eps(u, t) w.r.t. K_t of a PSLD network (eps w.r.t. its lower Cholesky factor, [x, m] blocks)."""

    def __init__(self, sde: Any, sqrt: Any, embedding_type: str = "fourier", numerical_eps: float = NUMERICAL_EPS):
        check_family(sde)
        self.sde, self.sqrt = sde, sqrt
        self.embedding_type, self.numerical_eps = embedding_type, float(numerical_eps)

    @staticmethod
    def network_channels(data_shape: tuple[int, ...], order: int) -> tuple[int, int]:
        return data_shape[-1] * order, data_shape[-1] * order

    to_network = staticmethod(langevin.to_blocks)

    def eps(self, net: Any, u: Array, t: Array, **net_kwargs: Any) -> Array:
        t = jnp.asarray(t, u.dtype)
        out = net(self.to_network(u), langevin.time_feature(t, self.embedding_type), **net_kwargs)
        eps_l = langevin.from_blocks(out.astype(u.dtype), u.shape[-1])
        l_eps = langevin.lower(*langevin.peer_cholesky(self.sde.covariance(t), self.numerical_eps))
        return langevin.eps_in_library_basis(self.sde, self.sqrt(t), l_eps, eps_l)


def check_family(sde: Any) -> None:
    if sde.name != "psld":
        raise ValueError(f"PSLD checkpoints need config.family.name='psld' (PSLD's SDE), got {sde.name!r}")
    p = sde.params
    if not p["gamma"] > 0:
        raise ValueError("PSLD with Gamma = 0 ('score_m' mode: C outputs, position score 0) is not supported: "
                         "set config.family.params.gamma to the checkpoint's Gamma > 0")
    critical = (p["gamma"] - p["nu"]) ** 2 / 4.0
    if not math.isclose(p["m_inv"], critical, rel_tol=1e-12):
        raise ValueError(f"PSLD uses critical M^-1 = (Gamma - nu)^2 / 4 = {critical:g}; config.family.params."
                         f"m_inv={p['m_inv']!r}: leave m_inv unset")


def check_config(config: Any) -> None:
    if config.model.get("mixed_score", False):
        raise ValueError("PSLD networks predict eps w.r.t. the Cholesky factor, no mixed score: set "
                         "config.model.mixed_score=False")


def default_numerical_eps(config: Any) -> float:
    return NUMERICAL_EPS


def make_preconditioner(sde: Any, sqrt: Any, model: Any) -> PsldPreconditioner:
    return PsldPreconditioner(sde, sqrt, embedding_type=model.kwargs.get("embedding_type", "fourier"),
                              numerical_eps=float(model.get("peer_numerical_eps", NUMERICAL_EPS)))


def convert(obj: Any, net: Any, image_shape: tuple[int, int], path: str, ema_rate: float = 0.9999
            ) -> tuple[dict, dict, float, int]:
    """(params, EMA params, EMA rate, step) from a loaded PSLD Lightning checkpoint object."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointMismatch(f"{path} is not a PSLD (PyTorch Lightning) checkpoint: expected a dict with "
                                 f"'state_dict', 'global_step', 'epoch', ...; found {keys}")
    sd = dict(obj["state_dict"])
    other = [k for k in sd if not (k.startswith(PREFIX) or k.startswith(EMA_PREFIX))]
    if other:
        raise report_mismatch(f"{path} ['state_dict']", [], other, [])
    if not any(k.startswith(EMA_PREFIX) for k in sd):
        raise CheckpointMismatch(f"{path} has no EMA network ('ema_score_fn.*' in 'state_dict'); PSLD's "
                                 f"SDEWrapper always saves one")
    params = ncsnpp_from_torch(sd, net, image_shape, prefix=PREFIX + "all_modules.", ignore=(),
                               what=f"{path} ['state_dict'] score_fn")
    ema_params = ncsnpp_from_torch(sd, net, image_shape, prefix=EMA_PREFIX + "all_modules.", ignore=(),
                                   what=f"{path} ['state_dict'] ema_score_fn")
    step = int(np.asarray(obj.get("global_step", 0)))
    return params, ema_params, float(ema_rate), step


def check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PSLD checkpoint {path} not found: expected a Lightning .ckpt file from "
                                f"{PUBLISHED}; nothing is downloaded")
