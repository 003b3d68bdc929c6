"""The training step: a pure function of (state, global batch), jitted with NamedShardings, state donated.

The batch is sharded along the mesh's 'data' axis and the state replicated; the loss is a mean over
the global batch, so XLA inserts the gradient all-reduce and the result does not depend on the
number of devices (up to float summation order). Random numbers come from fold_in(state.rng, step)
and are drawn with the global batch shape, so they are the same on 1 or N devices.

A step whose loss or gradient is not finite leaves the state unchanged (params, optimiser, EMA and
step) and reports ``nonfinite = 1``; the loop stops the run with an error before writing any
checkpoint after it, so the last good checkpoint stays the latest.

``n_steps_per_call`` = k > 1 runs k steps in one compiled call (``lax.scan`` over k stacked global
batches, sharded ``P(None, 'data')``), as score_sde's ``n_jitted_steps``: the same step function, k times
fewer dispatches and host round trips, and bitwise equal to k single steps on CPU (toy MLP, DDPM++ and
NCSN++ U-Nets: tests/test_training.py). For the U-Nets this holds because their convolutions
(models/conv.py) spell their input and kernel gradients as canonical convolutions: with jax's own
convolution VJP, XLA:CPU compiles those gradients differently inside the scan's while body (naive loop
nests instead of Eigen: last-bit differences in the kernel gradients, and a much slower loop).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.models.conv import canonical_gradients
from diffusion_jax.training.losses import check_loss_options, score_matching_loss
from diffusion_jax.training.setup import Experiment, shardings
from diffusion_jax.training.state import TrainState

Array = Any


def train_step_fn(exp: Experiment) -> Callable[[TrainState, Array], tuple[TrainState, dict]]:
    cfg = exp.config.training
    check_loss_options(exp.sde, cfg.objective, cfg.weighting, cfg.t_eps)

    def step(state: TrainState, batch: Array) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop = jax.random.split(key)

        def loss_of(params):
            eps_fn = exp.eps_fn(params, train=True, dropout_key=k_drop)
            loss, _ = score_matching_loss(eps_fn, exp.sde, exp.sqrt, k_loss, batch,
                                          objective=cfg.objective, weighting=cfg.weighting, t_eps=cfg.t_eps)
            return loss

        with canonical_gradients():     # the same conv gradients at top level and inside lax.scan
            loss, grads = jax.value_and_grad(loss_of)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with warm-up: rate min(r, (1 + n) / (10 + n)) so early averages do not keep the init.
        n = state.step.astype(jnp.float32)
        warm = (1.0 + n) / (10.0 + n)
        ema = {k: jax.tree_util.tree_map(lambda e, p, r=jnp.minimum(float(k), warm): r * e + (1.0 - r) * p,
                                         v, params)
               for k, v in state.ema.items()}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state)
        return new, dict(loss=loss, grad_norm=grad_norm, nonfinite=(~ok).astype(jnp.int32))

    return step


def jit_train_step(exp: Experiment, mesh: Mesh, state_sharding: Any = None, n_steps_per_call: int = 1):
    """The step under ``jax.jit``: state replicated (or ``state_sharding``) and donated, batch split
    along 'data'. With ``n_steps_per_call`` = k > 1 the batch is (k, global batch, ...) and the metrics
    come back stacked (k,)."""
    replicated, batch_sharding = shardings(mesh)
    state_sharding = replicated if state_sharding is None else state_sharding
    step = train_step_fn(exp)

    def steps(state: TrainState, batches: Array) -> tuple[TrainState, dict]:
        if n_steps_per_call == 1:
            return step(state, batches)
        return jax.lax.scan(step, state, batches)

    return jax.jit(steps, in_shardings=(state_sharding, batch_sharding_for(mesh, n_steps_per_call)),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def batch_sharding_for(mesh: Mesh, n_steps_per_call: int = 1) -> NamedSharding:
    """The sharding of the batch argument of :func:`jit_train_step`."""
    return NamedSharding(mesh, P("data") if n_steps_per_call == 1 else P(None, "data"))
