"""The execution model: samplers compile once per (method, options, shapes), with the network's parameters as an
argument (never lowered as constants); bad input fails before any compile; typed keys; sharded == unsharded;
streaming Frechet statistics. Compilations are counted from jax's compile log (``diffusion_jax.compilation``).
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, sdes
from diffusion_jax.compilation import CompileLog
from diffusion_jax.evaluation.fid import StreamingStatistics, feature_statistics, load_published_statistics
from diffusion_jax.samplers import prior_init, sample
from xla_env import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(nn.Module):
    """A small network eps(u, t) with real parameters."""

    @nn.compact
    def __call__(self, u, t):
        h = nn.Dense(16)(jnp.concatenate([u, jnp.broadcast_to(t[:, None, None], u.shape[:-1] + (1,))], -1))
        return nn.Dense(u.shape[-1])(jnp.tanh(h))


NET = Tiny()


def apply(params, u, t):
    return NET.apply(params, u, t)


def _params(seed, k):
    return NET.init(jax.random.PRNGKey(seed), jnp.zeros((1, 3, k)), jnp.zeros((1,)))


@pytest.mark.parametrize("method,opts", [("gddim", dict(order=2)), ("heun", {}), ("sscs", {}),
                                         ("gddim", dict(lam=1.0)), ("euler_maruyama", {})])
def test_sampler_compiles_once_across_params_noise_and_keys(method, opts):
    sde = sdes.make("cld")
    p1, p2 = _params(0, 2), _params(1, 2)
    u1, u2 = (prior_init(sde, jax.random.PRNGKey(i), 4, (3,)) for i in (0, 1))
    with CompileLog() as log:
        a, _ = sample(sde, apply, u1, params=p1, method=method, nfe=6, key=jax.random.key(0), **opts)
        b, _ = sample(sde, apply, u2, params=p2, method=method, nfe=6, key=jax.random.key(1), **opts)
        draw = samplers.compile(sde, apply, method=method, nfe=6, **opts)
        c = draw(p1, u2, jax.random.key(2)).u
        d = draw(p2, u1, jax.random.key(3)).u
    assert log.count("sampler_") == 1, log.compiled
    # different params / noise really gave different samples (nothing was frozen into the program)
    assert not np.allclose(a, b) and not np.allclose(c, d)
    if method in ("gddim", "heun") and not opts.get("lam"):     # deterministic: same inputs, same output
        np.testing.assert_array_equal(np.asarray(a), np.asarray(draw(p1, u1).u))


def test_handle_inside_user_jit_and_vmap():
    sde = sdes.make("vp")
    draw = samplers.compile(sde, apply, method="gddim", nfe=5)
    params = _params(0, 1)
    u0 = prior_init(sde, jax.random.PRNGKey(0), 3, (3,))
    direct = np.asarray(draw(params, u0).u)
    jitted = np.asarray(jax.jit(lambda p, u: draw(p, u).u)(params, u0))
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, _params(1, 1))
    batched = np.asarray(jax.vmap(lambda p: draw(p, u0).u)(stacked))
    np.testing.assert_allclose(jitted, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[0], direct, rtol=1e-5, atol=1e-6)


def test_lowered_sampler_does_not_grow_with_the_weights():
    """The DDPM++ CIFAR-10 config (about 62M parameters, 250 MB) lowers to well under 1 MB of StableHLO:
    parameters are arguments. Lowered from abstract shapes, so no weights are materialised."""
    from diffusion_jax.training import build_experiment, configs
    sizes = {}
    for nf in (64, 128):
        c = configs.cifar10("cld")
        c.model.kwargs.nf = nf
        exp = build_experiment(c, (32, 32, 3))
        abstract = jax.eval_shape(exp.init_params, 0)
        n_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(abstract))
        u0 = jax.ShapeDtypeStruct((8, 32, 32, 3, 2), jnp.float32)
        draw = samplers.compile(exp.sde, exp.apply, method="gddim", nfe=50, K=exp.sqrt)
        sizes[nf] = (len(draw.lower(abstract, u0).as_text()), n_bytes)
    (text64, bytes64), (text128, bytes128) = sizes[64], sizes[128]
    assert bytes128 > 2e8                                 # the full config: ~250 MB of float32 weights
    assert text128 < 1_000_000, text128
    assert text128 - text64 < 0.01 * (bytes128 - bytes64), sizes   # text does not follow the weights


def test_a_closure_over_weights_would_be_lowered_as_constants():
    """The property the previous test relies on, shown on the failure it prevents: a closed-over matrix
    becomes a constant of the program (~4 characters per byte), an argument does not."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    closed = jax.jit(lambda x: x @ w).lower(jnp.ones((2, 256))).as_text()
    passed = jax.jit(lambda w_, x: x @ w_).lower(w, jnp.ones((2, 256))).as_text()
    assert len(closed) > 100 * len(passed) and len(closed) > w.size


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="gddim", nfe=5, ode_jump=True), "gddim does not use option.*ode_jump.*its options are"),
    (dict(method="heun", nfe=5, order=2), "heun does not use option.*order"),
    (dict(method="edm_heun", nfe=5, grid="uniform"), "edm_heun does not use option.*grid"),
    (dict(method="euler", nfe=5, rho=3.0), "rho shapes the 'edm' and 'power' grids"),
    (dict(method="dopri5", nfe=5), "adaptive"),
    (dict(method="gddim", nfe=0), "nfe must be an integer >= 1"),
    (dict(method="gddim", nfe=3, order=3), "order <= 2"),
    (dict(method="rk4", nfe=5), "unknown sampling method"),
    (dict(method="gddim", nfe=5, grid="cosine"), "unknown time grid"),
    (dict(method="sscs", nfe=5), "needs a PRNG key"),
    (dict(method="gddim", nfe=5, output="velocity"), "unknown model output"),
])
def test_bad_input_fails_before_any_compile(kwargs, match):
    sde = sdes.make("cld")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (3,))
    with CompileLog() as log, pytest.raises(ValueError, match=match):
        sample(sde, apply, u0, params=_params(0, 2), **kwargs)
    assert log.count("sampler_") == 0


def test_bad_shapes_fail_before_any_compile():
    sde = sdes.make("cld")
    draw = samplers.compile(sde, apply, method="gddim", nfe=4)
    with CompileLog() as log:
        with pytest.raises(ValueError, match=r"u_init must have shape \(batch, \*data, k=2\)"):
            draw(_params(0, 2), jnp.zeros((2, 3, 3)))
        with pytest.raises(ValueError, match="the network returned shape"):
            samplers.compile(sde, lambda p, u, t: u[..., 0], method="gddim", nfe=4)(None, jnp.zeros((2, 3, 2)))
    assert log.count("sampler_") == 0


@pytest.mark.parametrize("method", samplers.METHODS)
def test_typed_keys_work_for_every_method(method):
    sde = sdes.make("cld")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (2,))
    nfe = None if method in samplers.DIFFRAX_ADAPTIVE else 7
    opts = dict(rtol=1e-3, atol=1e-3) if nfe is None else {}
    u, info = sample(sde, apply, u0, params=_params(0, 2), method=method, nfe=nfe, key=jax.random.key(3), **opts)
    assert u.shape == u0.shape and np.all(np.isfinite(np.asarray(u)))
    assert info.nfe >= 1 and info.ts.ndim == 1


def test_sharded_sampling_equals_unsharded():
    """8 forced host devices, the batch laid out over a 'data' mesh: the same samples as on one device."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_sampling_driver.py")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8
    for name, r in res["methods"].items():
        assert r["sharded"], name                       # the output really was spread over the 8 devices
        assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["scale"]), (name, r)


def test_streaming_frechet_statistics_equal_all_at_once():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5003, 37)) * rng.uniform(0.1, 3, size=37) + rng.normal(size=37) * 10
    acc = StreamingStatistics()
    for i in range(0, len(x), 777):
        acc.update(x[i:i + 777].astype(np.float32).astype(np.float64))
    mu, sigma = acc.statistics()
    mu_ref, sigma_ref = feature_statistics(x.astype(np.float32).astype(np.float64))
    assert np.max(np.abs(mu - mu_ref)) <= 1e-10 * np.max(np.abs(mu_ref))
    assert np.max(np.abs(sigma - sigma_ref)) <= 1e-10 * np.max(np.abs(sigma_ref))
    with pytest.raises(ValueError, match="feature dimension 5 differs"):
        acc.update(np.zeros((3, 5)))


def test_published_statistics_are_checked(tmp_path):
    good = tmp_path / "ref.npz"
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    assert load_published_statistics(str(good)).mu.shape == (4,)
    cases = {"nomu.npz": dict(sigma=np.eye(4)), "shape.npz": dict(mu=np.zeros(4), sigma=np.eye(3)),
             "asym.npz": dict(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]]))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    with pytest.raises(ValueError, match=r"lacks \['mu'\]"):
        load_published_statistics(str(tmp_path / "nomu.npz"))
    with pytest.raises(ValueError, match=r"mu must be \(d,\) and sigma \(d, d\)"):
        load_published_statistics(str(tmp_path / "shape.npz"))
    with pytest.raises(ValueError, match="not symmetric"):
        load_published_statistics(str(tmp_path / "asym.npz"))
    with pytest.raises(FileNotFoundError, match="'mu' \\(d,\\) and 'sigma'"):
        load_published_statistics(str(tmp_path / "missing.npz"))


def test_core_kernels_are_traced_once_for_all_programs(monkeypatch):
    """The float32 table kernels (Cholesky factor, transition, U_t) are traced once per (family, shape) however
    many programs use them: two different jitted functions of the same family and shape trace each kernel at
    most once between them (a per-call vectorize would trace it in both), and give the eager values."""
    from diffusion_jax.param.roots import SquareRoot, square_root
    from diffusion_jax.sdes.linear import LinearSDE
    counts = {"_chol_b": 0, "_expm": 0, "_rotation": 0}
    for cls, name in ((LinearSDE, "_chol_b"), (LinearSDE, "_expm"), (SquareRoot, "_rotation")):
        orig = getattr(cls, name)

        def counting(self, *a, _orig=orig, _name=name, **kw):
            if isinstance(a[0], jax.core.Tracer):              # the traced (float32) path, not the host tables
                counts[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(cls, name, counting)
    sde = sdes.make("cdhold", n=3, T=0.95)                       # a family no other test traces
    root = square_root(sde, "R")
    ts = jnp.linspace(0.1, 0.9, 5)
    f = jax.jit(lambda t: root(t) @ sde.transition(t=t, s=0.0))
    g = jax.jit(lambda t: jnp.sum(sde.cholesky(t), axis=0) + 2.0 * sde.transition(t=t, s=0.0)[0] + root(t)[-1])
    a, b = f(ts), g(ts)
    assert counts == {"_chol_b": 1, "_expm": 1, "_rotation": 1}, counts
    np.testing.assert_allclose(a, np.asarray(root(ts)) @ np.asarray(sde.transition(t=ts, s=0.0)), rtol=1e-6, atol=1e-7)
    assert b.shape == (3, 3)
