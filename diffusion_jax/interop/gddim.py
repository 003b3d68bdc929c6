r"""gDDIM's released JAX checkpoint (Zhang, Tao & Chen; github.com/qsh-zh/gDDIM, ``cld_jax``): CLD + NCSN++.

**File** (``run_lib.train``: ``flax.training.checkpoints.save_checkpoint(workdir/checkpoints, state,
step=step // snapshot_freq)``, flax 0.3.1): a file ``checkpoint_<n>`` holding
``flax.serialization.to_bytes(State)``, i.e. msgpack of the state dict

    {'step', 'optimizer': {'target': params, 'state': {'step', 'param_states'}}, 'lr',
     'model_state': {}, 'ema_rate', 'params_ema': params, 'rng'}

(``models.utils.State``; ``flax.optim.Optimizer``'s state dict is ``{'target', 'state'}``; Adam's per-leaf
``{'grad_ema', 'grad_sq_ema'}`` is not imported). It is read with flax's msgpack restore, which builds only
dicts, lists, numbers and numpy arrays (no pickle, nothing executed). The parameter trees are score_sde's
Flax NCSN++ names, which the library's :class:`~diffusion_jax.models.NCSNpp` uses one to one; both the raw
(``optimizer.target``) and the EMA weights (``params_ema``, used by every gDDIM sampler) are imported.

**Network input** (``models.utils.get_model_fn``): the state (batch, H, W, C, 2) with data centred in
[-1, 1] (``data.centered = True``), unscaled, as channels ``(g d)``: x_1..x_C then v_1..v_C (the library
interleaves, (d g)); time input 999 t, which NCSN++'s Fourier features see as log(999 t) (score_sde's
``jnp.log(used_sigmas)``) and the positional embedding as is. Output in the same ``(g d)`` layout.

**Parameterisation** (``get_eps_fn``, ``sde_lib.CLD.eps2score``): the output is eps w.r.t. gDDIM's R_t,
score = -R_t^{-T} eps, with ``mixed_score`` adding R_t^{-1} (0, v) to the output first. gDDIM's R_t solves

    dR/dt = F_t R + 1/2 G_t G_t^T R^{-T},   R_0 = diag(sqrt(1e-6), sqrt(gamma M + 1e-6))

(its ``numerical_eps`` 1e-6 in both entries), so R R^T is the covariance of a CLD started from
x_0 + N(0, 1e-6), v_0 ~ N(0, gamma M + 1e-6). This module solves the same ODE in float64 (gDDIM runs RK4
with dt = 1e-6 in float32; the two agree to ~1e-5 relative) and maps the output to the library's eps w.r.t.
K_t, exactly at the level of scores:

    eps_lib = -K_t^T score = K_t^T R_t^{-T} eps_gddim,

so the imported model's score is gDDIM's. (The library's CLD starts from x_0 exactly, without the 1e-6
regularisation; the difference is a data blur of std 1e-3, below 8-bit quantisation.)
"""
from __future__ import annotations

import functools
import math
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.integrate import solve_ivp

from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch, ncsnpp_from_flax
from diffusion_jax.sdes.base import apply_matrix

Array = Any
NUMERICAL_EPS = 1e-6            # gDDIM's sde_lib.CLD(numerical_eps=1e-6)
TIME_SCALE = 999.0              # get_eps_fn: labels = t * 999
PUBLISHED = ("gDDIM's released CIFAR-10 CLD model: a flax checkpoint file checkpoint_<n> (the README's "
             "'pretrain model checkpoint', seed 8, checkpoint 15), linked (Google Drive) from the README of "
             "github.com/qsh-zh/gDDIM, section 'gDDIM on CLD / Eval on cifar10'")
_CKPT_NAME = re.compile(r"^checkpoint_(\d+)$")


class GddimRoot:
    r"""gDDIM's square root R_t of a CLD family (see the module docstring), float64 on the host, a cubic
    Hermite interpolant in log t (knots ``per_octave`` per octave from 2^floor(log2 t_min) to T) at run time.

    The ODE is solved in t from t = 0 (where R_0 is regular thanks to the 1e-6 regularisation) with DOP853
    (rtol 1e-12); the knot derivatives dR/dlog t = t R'(t) come from the ODE itself.
    """

    def __init__(self, sde: Any, per_octave: int = 128):
        self.sde = sde
        check_family(sde)
        m_inv = float(sde.params["m_inv"])
        init_gamma = float(sde.params["init_gamma"])
        self.r0 = np.diag([math.sqrt(NUMERICAL_EPS), math.sqrt(init_gamma / m_inv + NUMERICAL_EPS)])
        e_lo = math.floor(math.log2(sde.t_min))
        n = int(math.ceil((math.log2(sde.T) - e_lo) * per_octave - 1e-9)) + 1
        self._e_lo, self._per_octave = e_lo, per_octave
        self._h = math.log(2.0) / per_octave
        taus = e_lo * math.log(2.0) + self._h * np.arange(n)
        ts = np.exp(taus)
        sol = solve_ivp(self._rhs, (0.0, float(ts[-1])), self.r0.ravel(), method="DOP853", rtol=1e-12,
                        atol=1e-15, t_eval=ts)
        if sol.status != 0:
            raise RuntimeError(f"solving gDDIM's R_t ODE failed: {sol.message}")
        self._r_tab = sol.y.T.reshape(n, 2, 2)
        self._dr_tab = np.stack([t * self._rhs(t, r.ravel()).reshape(2, 2) for t, r in zip(ts, self._r_tab)])
        self._n = n

    def _rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        r = y.reshape(2, 2)
        return (self.sde.drift_matrix_np(t) @ r
                + 0.5 * self.sde.noise_matrix_np(t) @ np.linalg.inv(r).T).ravel()

    def __call__(self, t: Array) -> Array:
        """R_t, shape (*t.shape, 2, 2), in t's dtype (float32 by default)."""
        t = jnp.asarray(t)
        dtype = t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32
        t = t.astype(dtype)
        # t = mant 2^expo split exactly (frexp): the position inside a knot cell keeps float32 precision
        mant, expo = jnp.frexp(t)
        frac = jnp.log2(2.0 * mant) * self._per_octave               # in [0, per_octave)
        cell = jnp.floor(frac)
        j = (expo - 1 - self._e_lo) * self._per_octave + cell.astype(jnp.int32)
        s = frac - cell
        s = jnp.where(j > self._n - 2, 1.0, jnp.where(j < 0, 0.0, s))[..., None, None]
        j = jnp.clip(j, 0, self._n - 2).astype(jnp.int32)
        r, dr = jnp.asarray(self._r_tab, dtype), jnp.asarray(self._dr_tab, dtype)
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = s * (1 - s) ** 2
        h01 = s * s * (3 - 2 * s)
        h11 = s * s * (s - 1)
        return h00 * r[j] + h10 * self._h * dr[j] + h01 * r[j + 1] + h11 * self._h * dr[j + 1]

    def np(self, t: float) -> np.ndarray:
        """R_t in float64 from a fresh ODE solve (for checks)."""
        if t == 0:
            return self.r0.copy()
        sol = solve_ivp(self._rhs, (0.0, float(t)), self.r0.ravel(), method="DOP853", rtol=1e-12, atol=1e-15)
        return sol.y[:, -1].reshape(2, 2)


def _inv2(m: Array) -> Array:
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    inv = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2)
    return inv / (a * d - b * c)[..., None, None]


def check_family(sde: Any) -> None:
    """gDDIM's CLD: a 'cld' family, critically damped (Gamma = 2 / sqrt(M^-1), gDDIM's only choice), T = 1."""
    if sde.name != "cld" or sde.order != 2:
        raise ValueError(f"gDDIM checkpoints hold a CLD model: set config.family.name='cld' (beta 4, m_inv 4, "
                         f"init_gamma 0.04 for the released model), got {sde.name!r}")
    p = sde.params
    if abs(float(p["gamma"]) - 2.0 / math.sqrt(float(p["m_inv"]))) > 1e-12 * float(p["gamma"]):
        raise ValueError(f"gDDIM's CLD is critically damped (Gamma = 2 / sqrt(m_inv) = "
                         f"{2.0 / math.sqrt(float(p['m_inv'])):g}); got config.family.params.gamma={p['gamma']}: "
                         f"leave gamma unset")
    if sde.T != 1.0:
        raise ValueError(f"gDDIM's CLD runs on [0, 1]: set config.family.params.T=1.0, got {sde.T}")


class GddimPreconditioner:
    """eps(u, t) w.r.t. the library's K_t of a gDDIM CLD network (see the module docstring).

    ``mixed``: gDDIM's ``model.mixed_score`` (output + R_t^{-1} (0, v)); ``embedding``: the network's time
    embedding ('fourier' sees log(999 t), 'positional' 999 t).
    """

    def __init__(self, sde: Any, sqrt: Any, mixed: bool = False, embedding: str = "fourier"):
        if embedding not in ("fourier", "positional"):
            raise ValueError(f"unknown NCSN++ time embedding {embedding!r}; gDDIM uses 'fourier' or 'positional'")
        self.sde = sde
        self.sqrt = sqrt
        self.root = gddim_root(sde)
        self.mixed = bool(mixed)
        self.embedding = embedding

    @staticmethod
    def to_network(u: Array) -> Array:
        """(batch, H, W, C, 2) -> (batch, H, W, 2 C) in gDDIM's (g d) order: x channels, then v channels."""
        if u.ndim != 5:
            raise ValueError(f"gDDIM's NCSN++ takes image states (batch, H, W, C, 2), got shape {u.shape}")
        return jnp.swapaxes(u, -1, -2).reshape(u.shape[:3] + (-1,))

    def c_noise(self, t: Array) -> Array:
        label = TIME_SCALE * t
        return jnp.log(label) if self.embedding == "fourier" else label

    def peer_eps(self, net: Any, u: Array, t: Array, **net_kwargs: Any) -> Array:
        """gDDIM's own eps (w.r.t. its R_t) of state ``u`` (batch, H, W, C, 2) at times ``t`` (batch,)."""
        t = jnp.asarray(t, u.dtype)
        out = net(self.to_network(u), self.c_noise(t), **net_kwargs).astype(u.dtype)
        b, h, w, c, k = u.shape
        out = jnp.swapaxes(out.reshape(b, h, w, k, c), -1, -2)
        if self.mixed:
            v_only = u.at[..., 0].set(0.0)
            out = out + apply_matrix(_inv2(self.root(t)), v_only)
        return out

    def eps(self, net: Any, u: Array, t: Array, **net_kwargs: Any) -> Array:
        """The library's eps w.r.t. K_t: K_t^T R_t^{-T} eps_gddim (same score)."""
        t = jnp.asarray(t, u.dtype)
        eps_g = self.peer_eps(net, u, t, **net_kwargs)
        a = jnp.swapaxes(self.sqrt(t), -1, -2) @ jnp.swapaxes(_inv2(self.root(t)), -1, -2)
        return apply_matrix(a, eps_g)


@functools.lru_cache(maxsize=32)
def gddim_root(sde: Any) -> GddimRoot:
    """Cached :class:`GddimRoot` per family (families are hashed by value)."""
    return GddimRoot(sde)


# ------------------------------------------------------------------ peer names carried in config.model.peer
def check_config(config: Any) -> None:
    embedding = dict(config.model.kwargs).get("embedding_type", "fourier")
    if embedding not in ("fourier", "positional"):
        raise ValueError(f"unknown NCSN++ time embedding {embedding!r} (config.model.kwargs.embedding_type); "
                         f"gDDIM uses 'fourier' or 'positional'")


def default_numerical_eps(config: Any) -> None:
    """None: gDDIM's regulariser (R_0 with 1e-6) is part of its R_t, not an option of the import."""
    return None


def make_preconditioner(sde: Any, sqrt: Any, model: Any) -> GddimPreconditioner:
    """From ``config.model``: ``mixed_score`` (gDDIM's model.mixed_score) and ``kwargs.embedding_type``."""
    return GddimPreconditioner(sde, sqrt, mixed=bool(model.get("mixed_score", False)),
                               embedding=dict(model.kwargs).get("embedding_type", "fourier"))


# ------------------------------------------------------------------ file
def resolve(path: str) -> str:
    """``path`` itself, or for a directory (flax's ``restore_checkpoint`` convention) its newest
    ``checkpoint_<n>``."""
    if os.path.isdir(path):
        found = [(int(m.group(1)), f) for f in os.listdir(path) if (m := _CKPT_NAME.match(f))]
        if not found:
            raise FileNotFoundError(f"{path} holds no gDDIM checkpoint file checkpoint_<n>: expected "
                                    f"{PUBLISHED}; nothing is downloaded")
        return os.path.join(path, max(found)[1])
    return path


def check_file(path: str) -> None:
    if not os.path.isfile(resolve(path)):
        raise FileNotFoundError(f"gDDIM checkpoint {path} not found: expected {PUBLISHED}; nothing is "
                                f"downloaded")


def load(path: str) -> Any:
    """The checkpoint's state dict (flax msgpack restore: plain containers and numpy arrays only)."""
    from flax import serialization
    path = resolve(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:              # truncated / not msgpack (e.g. a torch zip or a pickle)
        raise ValueError(f"{path} could not be read as a flax msgpack checkpoint ({type(e).__name__}: {e}); "
                         f"the file is truncated or corrupt (download it again), or it is not a gDDIM "
                         f"checkpoint") from e


def convert(obj: Any, net: Any, image_shape: tuple[int, int], path: str) -> tuple[dict, dict, float, int]:
    """(params, EMA params, EMA rate, step) from a gDDIM state dict (read from ``path``, a file or folder)."""
    path = resolve(path) if os.path.isdir(path) else path
    expected = ("step", "optimizer", "params_ema")
    if not isinstance(obj, dict) or any(k not in obj for k in expected) \
            or not isinstance(obj["optimizer"], dict) or "target" not in obj["optimizer"]:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointMismatch(f"{path} is not a gDDIM (flax models.utils.State) checkpoint: expected a state "
                                 f"dict with 'step', 'optimizer' ({{'target', 'state'}}), 'lr', 'model_state', "
                                 f"'ema_rate', 'params_ema', 'rng'; found {found}")
    model_state = obj.get("model_state") or {}
    if model_state:
        raise CheckpointMismatch(f"{path}: 'model_state' holds collections {sorted(model_state)}; gDDIM's NCSN++ "
                                 f"has none (another architecture?)")
    params = ncsnpp_from_flax(obj["optimizer"]["target"], net, image_shape,
                              what=f"{path} ['optimizer']['target']")
    ema = ncsnpp_from_flax(obj["params_ema"], net, image_shape, what=f"{path} ['params_ema']")
    rate = float(np.asarray(obj.get("ema_rate", 0.9999)))
    step = int(np.asarray(obj["step"]))
    return params, ema, rate, step


__all__ = ["GddimPreconditioner", "GddimRoot", "PUBLISHED", "check_config", "check_file", "convert",
           "default_numerical_eps", "load", "make_preconditioner"]
