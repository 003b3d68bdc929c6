"""The library's own products run at full float32 precision on every backend.

At the default precision XLA multiplies float32 operands in TensorFloat-32 (NVIDIA Ampere and later) or in
bfloat16 passes (TPU). The CPU computes every precision alike, so the float64 checks elsewhere cannot see it;
what can be checked here is the program: every dot_general that the samplers, the training loss and the exact
mixture functions emit around an elementwise model must carry Precision.HIGHEST (the model's own layers are
the user's choice and are left out by construction: this model has no products).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import exact, samplers, sdes
from diffusion_jax.param import square_root
from diffusion_jax.training.losses import score_matching_loss

HIGHEST = jax.lax.Precision.HIGHEST


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def dot_precisions(closed) -> list:
    """The precision of every dot_general in a closed jaxpr, nested jaxprs (jit, scan, while, cond) included."""
    found, todo = [], [closed.jaxpr]
    while todo:
        jaxpr = todo.pop()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                todo.extend(_sub_jaxprs(value))
    return found


def _low(precisions) -> list:
    return [p for p in precisions if p is None or any(q != HIGHEST for q in p)]


def model(params, u, t):
    """eps(u, t) without products of its own."""
    return params["a"] * jnp.tanh(u) + params["b"] * t.reshape((-1,) + (1,) * (u.ndim - 1))


PARAMS = dict(a=jnp.float32(0.5), b=jnp.float32(0.1))
FAMILIES = [("cld", {}, (3,)), ("cdhold", {"n": 4}, (3,)), ("bdm", {"shape": (4, 4, 1)}, (4, 4, 1))]


@pytest.mark.parametrize("name, params, data", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize("method, opts", [("gddim", {}), ("gddim", dict(lam=1.0)), ("heun", {}),
                                          ("euler_maruyama", {}), ("edm_heun", {})],
                         ids=["gddim", "gddim_sde", "heun", "euler_maruyama", "edm_heun"])
def test_sampler_products_are_full_precision(name, params, data, method, opts):
    sde = sdes.make(name, **params)
    if sde.deterministic_only and samplers.is_stochastic(method, opts.get("lam", 0.0)):
        pytest.skip("ODE-only family")
    draw = samplers.compile(sde, model, method=method, nfe=4, **opts)
    u0 = samplers.prior_init(sde, jax.random.PRNGKey(0), 2, data)
    closed = jax.make_jaxpr(lambda p, u, key: draw(p, u, key).u)(PARAMS, u0, jax.random.key(1))
    found = dot_precisions(closed)
    assert found, "no products found: the walk over the program is broken"
    assert not _low(found), f"{len(_low(found))} of {len(found)} products at default precision"


@pytest.mark.parametrize("name, params, data", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_loss_and_exact_products_are_full_precision(name, params, data):
    sde = sdes.make(name, **params)
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4,) + data)
    loss = lambda p, key: score_matching_loss(lambda u, t: model(p, u, t), sde, square_root(sde, "R"), key, x0)[0]
    found = dot_precisions(jax.make_jaxpr(jax.value_and_grad(loss))(PARAMS, jax.random.PRNGKey(1)))
    mix = exact.GaussianMixture.create(np.asarray(x0[:3]).reshape(3, -1), 0.01)
    u = samplers.prior_init(sde, jax.random.PRNGKey(2), 2, data)
    for fn in (exact.mixture_score, exact.mixture_denoiser, exact.mixture_eps):
        found += dot_precisions(jax.make_jaxpr(lambda v: fn(sde, mix, v, 0.5))(u))
    found += dot_precisions(jax.make_jaxpr(lambda v: exact.empirical_denoiser(sde, x0, v, 0.5))(u))
    assert found, "no products found: the walk over the program is broken"
    assert not _low(found), f"{len(_low(found))} of {len(found)} products at default precision"
