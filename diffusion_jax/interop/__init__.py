r"""Import checkpoints published by other codes as run directories of this library.

``import_checkpoint(fmt, path, config, workdir)`` reads the peer's file without torch (restricted
unpickler), maps every tensor by name onto the library's network with a full shape check, records the
peer's output parameterisation in ``config.model.peer`` (a peer preconditioner turns the network output
into the library's eps w.r.t. K_t), and writes ``workdir`` as training does (orbax checkpoint with params,
optimiser state, EMA; ``config.json``), so ``diffusion_jax.training.loop.load_run`` and every program built
on it (samplers, bench-nfe, bpd, analyze) load it like a trained run.

Formats (one module each, with ``check_file``, ``check_config``, ``make_preconditioner`` and ``convert``):

* ``score_sde`` (:mod:`.score_sde`): score_sde_pytorch, VP SDE, NCSN++ / DDPM++ layouts of the NCSN++ code.
* ``cld_sgm`` (:mod:`.cld_sgm`): CLD-SGM (NCSN++ on [x, v], velocity score with mixed score), family ``cld``.
* ``psld`` (:mod:`.psld`): PSLD's Lightning ``.ckpt`` (NCSN++ on [x, m], eps w.r.t. the Cholesky factor),
  family ``psld``.
* ``gddim`` (:mod:`.gddim`): gDDIM's released JAX/flax CLD checkpoint (msgpack, read without pickle; eps
  w.r.t. gDDIM's own R_t), family ``cld``. A module may define ``load(path)``; the others are torch files.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.interop.ncsnpp_weights import CheckpointMismatch

FORMATS = ("score_sde", "cld_sgm", "psld", "gddim")
PEERS = FORMATS


def _module(fmt: str) -> Any:
    return importlib.import_module(f"diffusion_jax.interop.{fmt}")


def make_peer_preconditioner(peer: str, sde: Any, sqrt: Any, model: Any = None) -> Any:
    """The preconditioner that turns a peer network's output into eps w.r.t. ``sqrt`` (K_t); ``model`` is
    ``config.model`` (embedding type, mixed score). It may define ``network_channels(data_shape, order)``
    -> (input, output) channels when the peer's network is not k C -> k C."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer parameterisation {peer!r} (config.model.peer); known: {PEERS}")
    if model is None:
        import ml_collections
        model = ml_collections.ConfigDict({"kwargs": {}})
    return _module(peer).make_preconditioner(sde, sqrt, model)


def _load(path: str) -> Any:
    from diffusion_jax.evaluation.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint
    try:
        return load_torch_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:        # truncated zip / pickle, bad header, short storage record
        raise ValueError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {e}); the file "
                         f"is truncated or corrupt: download it again") from e


def import_checkpoint(fmt: str, path: str, config: Any, workdir: str, numerical_eps: float | None = None) -> str:
    """Import ``path`` (format ``fmt``) with the library ``config`` (family, data, model.kwargs matching the
    checkpoint) into the run directory ``workdir``; returns ``workdir``.

    ``numerical_eps`` (cld_sgm, psld): the peer's covariance regulariser, which its file does not record
    (default: the peer's published setting for ``config.data.dataset``); kept as
    ``config.model.peer_numerical_eps``.

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
    peer = _module(fmt)
    peer.check_file(path)
    config.model.peer = fmt
    default_eps = peer.default_numerical_eps(config)
    if numerical_eps is None:
        numerical_eps = default_eps
    elif default_eps is None:
        raise ValueError(f"numerical_eps applies to the cld_sgm and psld formats only (not {fmt})")
    if numerical_eps is not None:
        value = float(numerical_eps)
        if not 0.0 <= value < 1e-2:
            raise ValueError(f"numerical_eps must be a small non-negative number (the peer's regulariser, "
                             f"1e-9 or 1e-6 in its configs), got {numerical_eps!r}")
        config.model.peer_numerical_eps = numerical_eps = value
    configs.validate(config)
    peer.check_config(config)
    shape = data_shape(config)
    exp = build_experiment(config, shape)          # checks the family for the peer before reading the file
    obj = peer.load(path) if hasattr(peer, "load") else _load(path)
    if fmt == "psld":                              # the Lightning file does not record the EMA decay
        params, ema_params, rate, step = peer.convert(obj, exp.net, shape[:2], path, ema_rate=config.ema_rates[0])
    else:
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
        json.dump({"format": fmt, "path": os.path.abspath(path), "step": step, "ema_rate": rate,
                   "numerical_eps": numerical_eps}, f, indent=2)
    return workdir


__all__ = ["FORMATS", "CheckpointMismatch", "import_checkpoint", "make_peer_preconditioner"]
