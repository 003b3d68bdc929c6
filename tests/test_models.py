"""Networks: shapes, conditioning, dropout, bf16, parameter count, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import DDPMpp, MLP, get_model

SMALL = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
# Parameter count of score_sde's own NCSNpp (models/ncsnpp.py) with
# configs/vp/cifar10_ddpmpp_continuous.py on 32x32x3, measured with jax.eval_shape on the
# upstream code; the paper's "DDPM++ cont. (VP)" is quoted as about 61.8M.
SCORE_SDE_DDPMPP_CIFAR10 = 61_804_419


def _key(seed: int) -> jax.Array:
    # XLA:CPU compiles threefry-heavy graphs (init, dropout) very slowly; 'rbg' keys keep
    # this file fast and exercise the same code paths.
    return jax.random.key(seed, impl="rbg")


def _perturb(params, scale=0.05, seed=0):
    """Add noise to every parameter: the near-zero output inits would make comparisons vacuous."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


def _count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_get_model():
    assert isinstance(get_model("mlp", out_dim=3), MLP)
    assert isinstance(get_model("DDPMpp", in_channels=6, out_channels=6), DDPMpp)
    with pytest.raises(ValueError, match="known models: ddpmpp, mlp"):
        get_model("unet")


def test_mlp_shape_and_time_dependence():
    model = MLP(out_dim=3, hidden=32, depth=2, time_embed_dim=16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)), jnp.float32)
    t = jnp.full((5,), 100.0)
    params = jax.jit(model.init)(_key(1), x, t)["params"]
    apply = jax.jit(lambda p, t: model.apply({"params": p}, x, t))
    out = apply(params, t)
    assert out.shape == (5, 3) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer
    params = _perturb(params)
    a, b = apply(params, t), apply(params, t + 300.0)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.fixture(scope="module")
def small_unet():
    """Small DDPM++ (8x8, 4 -> 4 channels), its init params and a jitted eval-mode apply."""
    model = DDPMpp(in_channels=4, out_channels=4, **SMALL)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.array([10.0, 900.0])
    params = jax.jit(lambda k: model.init(k, x, t, train=False))(_key(0))["params"]
    apply = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False))
    return model, params, apply, x, t


def test_ddpmpp_jit_shape_and_determinism(small_unet):
    model, params, apply, x, t = small_unet
    out = apply(params, x, t)
    assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) < 1e-3  # last conv starts near zero
    params = _perturb(params)
    a, b = apply(params, x, t), apply(params, x, t)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.std(a)) > 1e-2
    # The noise-level input actually conditions the output.
    assert float(jnp.max(jnp.abs(a - apply(params, x, t + 50.0)))) > 1e-3


def test_ddpmpp_dropout_active_in_training(small_unet):
    model, params, _, x, t = small_unet
    params = _perturb(params)
    apply = jax.jit(lambda p, k: model.apply({"params": p}, x, t, train=True, rngs={"dropout": k}))
    a, b, c = apply(params, _key(0)), apply(params, _key(1)), apply(params, _key(0))
    np.testing.assert_array_equal(a, c)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def matmul_dtypes(fn, *args) -> list[str]:
    """Operand dtypes of every dot_general / conv_general_dilated in the jaxpr of ``fn(*args)`` (sub-jaxprs
    of jit, custom_vjp, scan, ... included): where the FLOPs of a network actually run."""
    def walk(jaxpr):
        out = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                out.append("/".join(str(v.aval.dtype) for v in eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        out += walk(inner)
        return out
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_ddpmpp_bf16(small_unet):
    """dtype=bfloat16: every conv and matmul runs on bfloat16 operands, parameters and the output stay float32,
    and the output differs from float32 compute by bfloat16 rounding (8-bit mantissa: ~1e-2 relative), far
    above float32 rounding (~1e-6) and below a loose bound."""
    _, params, apply, x, t = small_unet
    model16 = DDPMpp(in_channels=4, out_channels=4, dtype=jnp.bfloat16, **SMALL)
    shapes16 = jax.eval_shape(lambda: model16.init(_key(0), x, t, train=False))["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))  # params stay f32
    params = _perturb(params)
    apply16 = lambda p: model16.apply({"params": p}, x, t, train=False)
    ops16, ops32 = matmul_dtypes(apply16, params), matmul_dtypes(lambda p: apply(p, x, t), params)
    assert len(ops16) == len(ops32) >= 10 and set(ops16) == {"bfloat16/bfloat16"}, set(ops16)
    assert set(ops32) == {"float32/float32"}, set(ops32)
    out16 = jax.jit(apply16)(params)
    out32 = apply(params, x, t)
    assert out16.dtype == jnp.float32 and out16.shape == out32.shape
    assert bool(jnp.all(jnp.isfinite(out16)))
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 1e-3 < rel < 0.1, rel


def test_ddpmpp_cifar10_param_count():
    def count(channels: int) -> int:
        model = DDPMpp(in_channels=channels, out_channels=channels)  # CIFAR-10 DDPM++ defaults
        x = jnp.zeros((1, 32, 32, channels))
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), train=False))
        return _count(shapes["params"])

    n3, n6 = count(3), count(6)
    print(f"DDPM++ CIFAR-10 params: 3 channels {n3:,}, 6 channels {n6:,}")
    assert n3 == SCORE_SDE_DDPMPP_CIFAR10
    assert abs(n6 - SCORE_SDE_DDPMPP_CIFAR10) / SCORE_SDE_DDPMPP_CIFAR10 < 0.01


@pytest.mark.parametrize("shape,t_shape,match", [
    ((2, 8, 8, 3), (2,), "in_channels=4 but x has 3 channels"),
    ((2, 6, 6, 4), (2,), "must be divisible by 2\\*\\*\\(len\\(ch_mult\\)-1\\) = 4"),
    ((8, 8, 4), (2,), "rank 4"),
    ((2, 8, 8, 4), (), "t_embed_input must have shape"),
])
def test_ddpmpp_bad_input(shape, t_shape, match):
    model = DDPMpp(in_channels=4, out_channels=4, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros(t_shape),
                                          train=False))


def test_mlp_bad_input():
    with pytest.raises(ValueError, match="flat input"):
        MLP(out_dim=2).init(jax.random.PRNGKey(0), jnp.zeros((2, 3, 3)), jnp.zeros((2,)))
