r"""score_sde_pytorch checkpoints (Song et al. 2021): NCSN++ / DDPM++ trained with the VP SDE.

**File** (``run_lib.save_checkpoint``): ``torch.save({'optimizer', 'model', 'ema', 'step'})`` where
``model`` is the state dict of ``torch.nn.DataParallel(NCSNpp)`` (keys ``module.all_modules.<i>.*`` and
the buffer ``module.sigmas``) and ``ema`` is ``{'decay', 'num_updates', 'shadow_params'}``, the
shadow parameters listed in ``model.parameters()`` order (trainable ones only: the frozen Fourier
``W`` is not averaged and comes from ``model``).

**Parameterisation** (``models.utils.get_score_fn``, VP, continuous): the network sees the state x
itself (data centred in [-1, 1]) and the time feature 999 t, and its output o is eps w.r.t. the
marginal std: score = -o / std_t, std_t^2 = 1 - m_t^2 = Sigma_t. The library's eps w.r.t. K_t (k = 1,
K_t = +-std_t) is eps = -K_t^T score = (K_t / std_t) o.

VE checkpoints are refused: score_sde's VE models see data in [0, 1] (``data.centered = False``,
mapped by 2 x - 1 inside the network), a different diffusion from the library's VE on [-1, 1] data.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch, ncsnpp_from_torch
from diffusion_jax.param.precond import Preconditioner

Array = Any
PUBLISHED = ("score_sde_pytorch's checkpoints (checkpoints/<config>/checkpoint_<n>.pth or "
             "checkpoint-meta), linked from the README of github.com/yang-song/score_sde_pytorch")


class ScoreSdeVPPreconditioner:
    """eps(u, t) of a score_sde VP network: raw state in, time feature 999 t, output eps w.r.t. std_t."""

    def __init__(self, sde: Any, sqrt: Any):
        if sde.name != "vp" or sde.order != 1:
            raise ValueError(f"score_sde VP checkpoints need config.family.name='vp', got {sde.name!r}")
        self.sde = sde
        self.sqrt = sqrt

    to_network = staticmethod(Preconditioner.to_network)

    def eps(self, net: Any, u: Array, t: Array, **net_kwargs: Any) -> Array:
        t = jnp.asarray(t, u.dtype)
        out = net(self.to_network(u), 999.0 * t, **net_kwargs).astype(u.dtype).reshape(u.shape)
        std = jnp.sqrt(self.sde.covariance(t)[..., 0, 0])
        scale = self.sqrt(t)[..., 0, 0] / std
        return out * scale.reshape(scale.shape + (1,) * (u.ndim - 1))


def _strip(state_dict: Mapping[str, Any]) -> tuple[dict, str]:
    prefix = "module." if any(k.startswith("module.") for k in state_dict) else ""
    return dict(state_dict), prefix


def convert(obj: Any, net: Any, image_shape: tuple[int, int], path: str, peer: str = "score_sde_pytorch"
            ) -> tuple[dict, dict, float, int]:
    """(params, EMA params, EMA rate, step) from a loaded checkpoint object of score_sde_pytorch's
    ``run_lib`` layout (also CLD-SGM's: ``peer`` names the code in messages)."""
    if not isinstance(obj, dict) or "model" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointMismatch(f"{path} is not a {peer} checkpoint: expected a dict with 'model', "
                                 f"'ema', 'optimizer', 'step'; found {keys}")
    model_sd, prefix = _strip(obj["model"])
    params = ncsnpp_from_torch(model_sd, net, image_shape, prefix=prefix + "all_modules.",
                               what=f"{path} ['model']")
    ema_obj = obj.get("ema")
    if not isinstance(ema_obj, dict) or "shadow_params" not in ema_obj:
        raise CheckpointMismatch(f"{path} has no EMA state ('ema' with 'shadow_params'); {peer} "
                                 f"checkpoints carry one")
    shadow = list(ema_obj["shadow_params"])
    # model.parameters() order = state-dict order without buffers; the frozen Fourier W is not averaged
    trainable = [k for k, v in model_sd.items() if k != prefix + "sigmas"
                 and not (k.endswith(".W") and np.ndim(v) == 1)]
    if len(shadow) != len(trainable):
        raise CheckpointMismatch(f"{path}: {len(shadow)} EMA shadow parameters for {len(trainable)} trainable "
                                 f"tensors in 'model'")
    wrong = [(k, np.shape(s), np.shape(model_sd[k])) for k, s in zip(trainable, shadow)
             if np.shape(s) != np.shape(model_sd[k])]
    if wrong:
        raise CheckpointMismatch(f"{path}: EMA shadow parameters do not line up with 'model': " + ", ".join(
            f"{k} {s} (expected {e})" for k, s, e in wrong))
    ema_sd = dict(model_sd)
    ema_sd.update(zip(trainable, shadow))
    ema_params = ncsnpp_from_torch(ema_sd, net, image_shape, prefix=prefix + "all_modules.",
                                   what=f"{path} ['ema']")
    step = int(np.asarray(obj.get("step", 0)))
    return params, ema_params, float(ema_obj.get("decay", 0.9999)), step


def make_preconditioner(sde: Any, sqrt: Any, model: Any) -> ScoreSdeVPPreconditioner:
    return ScoreSdeVPPreconditioner(sde, sqrt)


def check_config(config: Any) -> None:
    """Nothing beyond the family check of the preconditioner."""


def default_numerical_eps(config: Any) -> None:
    """score_sde's VP score has no covariance regulariser."""
    return None


def check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"score_sde checkpoint {path} not found: expected a file such as "
                                f"checkpoint_<n>.pth from {PUBLISHED}; nothing is downloaded")
