r"""Import checkpoints published by other codes as run directories of this library.

``import_checkpoint(fmt, path, config, workdir)`` reads the peer's file without torch (restricted
unpickler), maps every tensor by name onto the library's network with a full shape check, records the
peer's output parameterisation in ``config.model.peer`` (a peer preconditioner turns the network output
into the library's eps w.r.t. K_t), and writes ``workdir`` as training does (orbax checkpoint with params,
optimiser state, EMA; ``config.json``), so ``diffusion_jax.training.loop.load_run`` and every program built
on it (samplers, bench-nfe, bpd, analyze) load it like a trained run.

Formats: ``score_sde`` (score_sde_pytorch, VP SDE, NCSN++ / DDPM++ layouts of the NCSN++ code), ``gddim``
(gDDIM's released JAX/flax CLD checkpoint; :mod:`diffusion_jax.interop.gddim`).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch

FORMATS = ("score_sde", "gddim")
PEERS = ("score_sde", "gddim")


def make_peer_preconditioner(peer: str, sde: Any, sqrt: Any) -> Any:
    """The preconditioner that turns a peer network's output into eps w.r.t. ``sqrt`` (K_t)."""
    if peer == "score_sde":
        from diffusion_jax.interop.score_sde import ScoreSdeVPPreconditioner
        return ScoreSdeVPPreconditioner(sde, sqrt)
    if peer.split("+")[0] == "gddim":             # gddim[+mixed][+positional]
        from diffusion_jax.interop import gddim
        return gddim.make_preconditioner(peer, sde, sqrt)
    raise ValueError(f"unknown peer parameterisation {peer!r} (config.model.peer); known: {PEERS}")


def _load(path: str) -> Any:
    from diffusion_jax.evaluation.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint
    try:
        return load_torch_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:        # truncated zip / pickle, bad header, short storage record
        raise ValueError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {e}); the file "
                         f"is truncated or corrupt: download it again") from e


def import_checkpoint(fmt: str, path: str, config: Any, workdir: str) -> str:
    """Import ``path`` (format ``fmt``) with the library ``config`` (family, data, model.kwargs matching the
    checkpoint) into the run directory ``workdir``; returns ``workdir``.

    Raises FileNotFoundError (names the expected file and where it is published), ValueError (unreadable /
    truncated file, config not matching the format), UnsafeCheckpointError (the pickle names a global outside
    the allowlist; nothing is executed), CheckpointMismatch (missing / extra / wrong-shape tensors listed),
    FileExistsError (``workdir`` already holds checkpoints).
    """
    from diffusion_jax.training import configs
    from diffusion_jax.data import data_shape
    from diffusion_jax.training.checkpoint import Checkpointer
    from diffusion_jax.training.setup import build_experiment
    from diffusion_jax.training.state import TrainState, ema_key

    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {FORMATS}")
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"{workdir} already holds checkpoints: import into a fresh --workdir")
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    if config.model.name != "ncsnpp":
        raise ValueError(f"a {fmt} checkpoint holds an NCSN++-code network: set config.model.name='ncsnpp' "
                         f"(DDPM++ layouts: fir=False, progressive_input='none', embedding_type='positional'), "
                         f"got {config.model.name!r}")
    from diffusion_jax.interop import gddim, score_sde
    peer = gddim if fmt == "gddim" else score_sde
    peer.check_file(path)
    config.model.peer = gddim.peer_name(config) if fmt == "gddim" else fmt
    configs.validate(config)
    shape = data_shape(config)
    exp = build_experiment(config, shape)          # checks the family for the peer before reading the file
    obj = gddim.load(path) if fmt == "gddim" else _load(path)
    params, ema_params, rate, step = peer.convert(obj, exp.net, shape[:2], path)

    config.ema_rates = (rate,)
    to_jnp = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)   # noqa: E731
    params, ema_params = to_jnp(params), to_jnp(ema_params)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=exp.tx.init(params),
                       ema={ema_key(rate): ema_params}, rng=jax.random.PRNGKey(config.seed))
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=1, async_save=False)
    ckpt.save(state, None, config.to_json_best_effort())
    ckpt.wait()
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "imported_from.json"), "w") as f:
        json.dump({"format": fmt, "path": os.path.abspath(path), "step": step, "ema_rate": rate}, f, indent=2)
    return workdir


__all__ = ["FORMATS", "CheckpointMismatch", "import_checkpoint", "make_peer_preconditioner"]
