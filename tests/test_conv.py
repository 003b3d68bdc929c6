"""models/conv.py: the convolution with a canonical-form kernel gradient.

Forward values and input gradients must be jax's own (bitwise); the kernel gradient must equal jax's
VJP (float64: to rounding; float32: to a few ulps) and a direct float64 sum over windows; and, the
reason it exists, the gradient inside ``lax.scan`` must be bitwise the one at top level.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.models.conv import canonical_gradients, conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _canonical(request):
    """The canonical-gradient path is what these tests check: active while each test traces (except
    the test of the default path)."""
    if request.node.name == "test_forward_mode_works_outside_the_training_context":
        yield
        return
    with canonical_gradients():
        yield


def test_forward_mode_works_outside_the_training_context():
    """Outside canonical_gradients the conv is lax's, so jax.jvp (the likelihood's divergence) works and
    equals lax's; inside, it is a custom_vjp, which forward mode refuses."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 4)), jnp.float32)
    f = lambda x: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)       # noqa: E731
    g = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)   # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jvp(f, (x,), (x,))[1]), np.asarray(jax.jvp(g, (x,), (x,))[1]))
    with canonical_gradients(), pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (x,), (x,))
# (x shape NHWC, w shape HWIO, strides, padding, lhs_dilation): 'SAME' 3x3 and 1x1 (U-Net layers),
# stride 2 with explicit / VALID pads (strided and FIR-downsampling convs), lhs dilation 2 (the
# transposed conv of FIR upsampling), uneven kernel/strides/pads, grouped (feature_group_count).
CASES = [
    ((3, 8, 8, 2), (3, 3, 2, 5), (1, 1), "SAME", None),
    ((3, 8, 8, 4), (1, 1, 4, 3), (1, 1), "SAME", None),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), ((0, 1), (0, 1)), None),
    ((2, 9, 8, 3), (3, 3, 3, 4), (2, 2), "VALID", None),
    ((2, 5, 6, 3), (3, 3, 3, 2), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((2, 7, 7, 3), (4, 2, 3, 2), (3, 2), ((1, 2), (0, 3)), None),
    ((2, 8, 8, 4), (4, 4, 1, 4), (2, 2), ((1, 1), (1, 1)), None, 4),     # depthwise (FIR down)
    ((2, 5, 5, 4), (4, 4, 1, 4), (1, 1), ((2, 2), (2, 2)), (2, 2), 4),   # depthwise (FIR up)
    ((2, 6, 6, 6), (3, 3, 2, 9), (1, 1), "SAME", None, 3),               # 3 groups of 2 -> 3
]


def _dw_direct(x, g, w_shape, strides, pads, lhs_dil, groups=1):
    """float64 numpy: dw[i, j, c, o] = sum_{n, h, v} xp[n, h s + i, v s + j, c] g[n, h, v, o], with c
    running over the input channels of o's group."""
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    d = (1, 1) if lhs_dil is None else lhs_dil
    n, hh, ww, c = x.shape
    xd = np.zeros((n, (hh - 1) * d[0] + 1, (ww - 1) * d[1] + 1, c))
    xd[:, ::d[0], ::d[1]] = x
    if isinstance(pads, str):
        pads = lax.padtype_to_pads(xd.shape[1:3], w_shape[:2], strides, pads)
    (t, b), (l, r) = pads
    xp = np.pad(xd, ((0, 0), (max(t, 0), max(b, 0)), (max(l, 0), max(r, 0)), (0, 0)))
    oh, ow = g.shape[1:3]
    dw = np.zeros(w_shape)
    for i in range(w_shape[0]):
        for j in range(w_shape[1]):
            win = xp[:, i:i + (oh - 1) * strides[0] + 1:strides[0], j:j + (ow - 1) * strides[1] + 1:strides[1]]
            full = np.einsum("nhvc,nhvo->co", win, g)           # every (input, output) pair
            cin, cout = w_shape[2], w_shape[3]
            for k in range(groups):
                o = slice(k * cout // groups, (k + 1) * cout // groups)
                dw[i, j, :, o] = full[k * cin:(k + 1) * cin, o]
    return dw


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_jax(case):
    xs, ws, strides, pad, lhs_dil = case[:5]
    groups = case[5] if len(case) > 5 else 1
    rng = np.random.default_rng(0)
    for dtype, rtol in ((np.float64, 1e-13), (np.float32, 2e-6)):
        with jax.enable_x64(dtype == np.float64):
            x = jnp.asarray(rng.standard_normal(xs), dtype)
            w = jnp.asarray(rng.standard_normal(ws), dtype)

            def ref(x, w):
                return lax.conv_general_dilated(x, w, strides, pad, lhs_dilation=lhs_dil, dimension_numbers=DN,
                                                feature_group_count=groups)

            def new(x, w):
                return conv_general_dilated(x, w, strides, pad, lhs_dilation=lhs_dil, dimension_numbers=DN,
                                            feature_group_count=groups)
            y_ref, vjp_ref = jax.vjp(ref, x, w)
            y_new, vjp_new = jax.vjp(new, x, w)
            g = jnp.asarray(rng.standard_normal(y_ref.shape), dtype)
            (dx_ref, dw_ref), (dx_new, dw_new) = vjp_ref(g), vjp_new(g)
            assert y_new.dtype == dtype and dw_new.dtype == dtype
            np.testing.assert_array_equal(y_new, y_ref)
            if groups == 1:
                np.testing.assert_array_equal(dx_new, dx_ref)
            np.testing.assert_allclose(dx_new, dx_ref, rtol=0, atol=rtol * float(np.max(np.abs(dx_ref))))
            scale = float(np.max(np.abs(dw_ref)))
            np.testing.assert_allclose(dw_new, dw_ref, rtol=0, atol=rtol * scale)
            direct = _dw_direct(x, g, ws, strides, pad, lhs_dil, groups)
            np.testing.assert_allclose(np.asarray(dw_new, np.float64), direct, rtol=0, atol=rtol * scale)


def test_flax_conv_uses_it_and_other_convolutions_fall_back_to_lax():
    import flax.linen as nn
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
    w4 = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
    f_new = lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
    f_ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
    y, vjp = jax.vjp(f_new, x, w4)
    y_ref, vjp_ref = jax.vjp(f_ref, x, w4)
    np.testing.assert_array_equal(y, y_ref)
    for a, b in zip(vjp(jnp.cos(y)), vjp_ref(jnp.cos(y))):
        np.testing.assert_array_equal(a, b)
    conv = nn.Conv(3, (3, 3), padding="SAME", conv_general_dilated=conv_general_dilated)
    plain = nn.Conv(3, (3, 3), padding="SAME")
    params = plain.init(jax.random.key(0), x)
    loss = lambda m: (lambda p: jnp.sum(jnp.sin(m.apply(p, x))))
    g_new, g_ref = jax.grad(loss(conv))(params), jax.grad(loss(plain))(params)
    np.testing.assert_array_equal(g_new["params"]["bias"], g_ref["params"]["bias"])
    np.testing.assert_allclose(g_new["params"]["kernel"], g_ref["params"]["kernel"], rtol=1e-5, atol=1e-6)


def test_gradients_inside_scan_are_bitwise_the_top_level_ones():
    """The reason for the module: with lax.conv_general_dilated's own VJP this comparison fails on
    CPU (jax 0.10: kernel gradients differ by up to 5e-5 here); with the canonical forms it holds.
    Covers a 'SAME' 3x3, a stride-2 and an input-dilated (transposed) convolution."""
    rng = np.random.default_rng(2)
    xs = jnp.asarray(rng.standard_normal((3, 16, 8, 8, 8)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((3, 3, 8, 8)) * 0.1, jnp.float32) for _ in range(3)]

    def grads(ws, x):
        def loss(ws, x):
            h = jnp.tanh(conv_general_dilated(x, ws[0], (1, 1), "SAME", dimension_numbers=DN))
            h = jnp.tanh(conv_general_dilated(h, ws[1], (2, 2), ((0, 1), (0, 1)), dimension_numbers=DN))
            h = conv_general_dilated(h, ws[2], (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=DN)
            return jnp.sum(jnp.tanh(h))
        return jax.grad(loss, argnums=(0, 1))(ws, x)
    top = [jax.jit(grads)(ws, x) for x in xs]
    scanned = jax.jit(lambda ws, xs: lax.scan(lambda c, x: (c, grads(ws, x)), 0, xs)[1])(ws, xs)
    for i, t in enumerate(top):
        for a, b in zip(jax.tree_util.tree_leaves(t), jax.tree_util.tree_leaves(scanned)):
            np.testing.assert_array_equal(b[i], a)
