"""A flat train state (big_vision style) and the optimiser a config asks for."""
from __future__ import annotations

from typing import Any

import math

import flax
import jax
import jax.numpy as jnp
import optax

Array = Any


@flax.struct.dataclass
class TrainState:
    """step, params, optimiser state, EMA copies of the params (one per rate), and the run's PRNG key.

    ``ema`` maps ``str(rate)`` to a params pytree. ``rng`` is a raw uint32 key (checkpointable);
    step i uses ``fold_in(rng, i)``, so a resumed run draws the same numbers.
    """
    step: Array
    params: Any
    opt_state: Any
    ema: dict
    rng: Array


def ema_key(rate: float) -> str:
    return f"{float(rate):g}"


def pick_ema(state: Any, rate: str | float | None = None) -> tuple[str, Any]:
    """(rate key, EMA params): the given rate, else the slowest average (largest rate)."""
    rates = dict(state.ema)
    if not rates:
        raise ValueError("the run's state has no EMA parameters (config.ema_rates is empty)")
    if rate is None:
        key = max(rates, key=float)
    else:
        matches = [k for k in rates if math.isclose(float(k), float(rate), rel_tol=0, abs_tol=1e-12)]
        if not matches:
            raise ValueError(f"EMA rate {rate} is not in the run; it has {sorted(rates, key=float)} "
                             f"(pass one of them with --ema)")
        key = matches[0]
    return key, rates[key]


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """Linear warm-up to ``lr``, then cosine decay to ``decay_to * lr`` (1.0: constant), with
    global-norm clipping (``grad_clip`` > 0) and Adam or AdamW."""
    warmup = int(optim.warmup)
    decay_steps = max(int(num_steps) - warmup, 1)
    if optim.decay_to >= 1.0:
        after = optax.constant_schedule(optim.lr)
    else:
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=float(optim.decay_to))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup]) \
        if warmup > 0 else after
    if optim.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    return optax.chain(*parts, opt)


def create_state(params: Any, tx: optax.GradientTransformation, ema_rates, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema={ema_key(r): jax.tree_util.tree_map(jnp.copy, params) for r in ema_rates},
                      rng=jax.random.PRNGKey(seed))
