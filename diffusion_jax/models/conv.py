"""2-D convolution (NHWC input, HWIO kernel) whose gradients are written as canonical convolutions.

Why: for y = conv(x, w) (stride s, padding, input dilation d) jax's VJP computes

    dw[i, j, c, o] = sum_{n, h, v} xp[n, h s + i, v s + j, c] g[n, h, v, o]
    dx             = conv(g dilated by s, w flipped in space with c and o swapped)

(xp: x dilated by d and padded, g: the output cotangent) as convolutions with non-canonical
dimension labels: the kernel gradient contracts the *batch* dimension N as a feature
(``dim_labels=f01b_i01o->01bf``), the input gradient reads the kernel as ``01oi``. XLA:CPU rewrites
those into the canonical ``b01f_01io->b01f`` form its Eigen kernel runs when they appear in the
top-level computation, but not inside a ``while`` body (``lax.scan``, ``fori_loop``), where they are
emitted as naive loop nests: another summation order (kernel gradients differing in the last bits
between a step at top level and the same step inside ``lax.scan``) and several times slower.

Here the same sums are spelled as canonical convolutions on explicitly transposed operands,

    dw = conv(x^T (C, H, W, N), g^T (OH, OW, N, O); window dilation s)^T  -> (KH, KW, C, O)
    dx = conv(g, flip(w)^T (KH, KW, O, C); input dilation s, stride d),

so the compiler sees the form it runs with Eigen in every context: the gradients are bitwise the
same at top level and inside loops, and loops run at the speed of the top-level step. The forward
pass is lax's. Grouped convolutions (the depthwise FIR filters of NCSN++) get the canonical input
gradient (per group, in and out swapped) and jax's own kernel gradient (their kernels are constants
there; a trainable grouped kernel would keep jax's last-bit differences inside loops).
Batch-grouped or kernel-dilated convolutions and other layouts go to ``lax.conv_general_dilated``
unchanged (jax's own VJP).

Scope: a ``custom_vjp`` function cannot be differentiated in forward mode (``jax.jvp``), which the
likelihood's divergence and other analyses use on the same networks. So the canonical-gradient
convolution is used only while :func:`canonical_gradients` is active when the function is *traced*
(the training step enters it around its loss and gradient); everywhere else this is lax's convolution.
"""
from __future__ import annotations

import contextlib
import threading
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = Any
_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))     # lhs / rhs / out specs of NHWC, HWIO, NHWC
_DN = ("NHWC", "HWIO", "NHWC")


_TRACE = threading.local()


@contextlib.contextmanager
def canonical_gradients() -> Iterator[None]:
    """Within this context (at trace time) the library's convolutions get the canonical-form VJP."""
    previous = getattr(_TRACE, "on", False)
    _TRACE.on = True
    try:
        yield
    finally:
        _TRACE.on = previous


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Optional[Sequence[int]] = None,
                         rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
    """Drop-in for ``lax.conv_general_dilated`` (and flax ``nn.Conv(conv_general_dilated=...)``).

    Inside :func:`canonical_gradients`, for 2-D NHWC / HWIO convolutions without batch groups or kernel
    dilation the input and kernel gradients are the canonical-form convolutions of the module docstring
    (the same sums as jax's VJP); everything else is passed to lax unchanged. Forward values are lax's.
    """
    plain = partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                    batch_group_count=batch_group_count, precision=precision,
                    preferred_element_type=preferred_element_type)
    if not getattr(_TRACE, "on", False) or lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1:
        return plain(lhs, rhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != _NHWC:
        return plain(lhs, rhs)
    if rhs_dilation is not None and tuple(rhs_dilation) != (1, 1):
        return plain(lhs, rhs)
    strides = tuple(int(s) for s in window_strides)
    lhs_dil = (1, 1) if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
    if isinstance(padding, str):
        in_dil = tuple((n - 1) * d + 1 for n, d in zip(lhs.shape[1:3], lhs_dil))
        pads = lax.padtype_to_pads(in_dil, rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _conv(lhs, rhs, strides, pads, lhs_dil, int(feature_group_count), precision,
                 preferred_element_type)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _conv(x, w, strides, pads, lhs_dil, groups, precision, pet):
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation=lhs_dil, dimension_numbers=_DN,
                                    feature_group_count=groups, precision=precision,
                                    preferred_element_type=pet)


def _conv_fwd(x, w, strides, pads, lhs_dil, groups, precision, pet):
    return _conv(x, w, strides, pads, lhs_dil, groups, precision, pet), (x, w)


def _conv_bwd(strides, pads, lhs_dil, groups, precision, pet, res, g):
    x, w = res
    kh, kw, cin_g, cout = w.shape
    # input gradient: the flipped kernel, in/out swapped, run over g (dilated by the stride); the
    # transposed kernel is an explicit operand so the convolution is canonical (as jax's own rule,
    # whose swapped 'oi' kernel labels XLA:CPU leaves to a slow loop nest inside while bodies).
    pads_x = []
    for n, d, (lo, hi), s, k, o in zip(x.shape[1:3], lhs_dil, pads, strides, (kh, kw), g.shape[1:3]):
        before = k - 1 - lo
        pads_x.append((before, ((n - 1) * d + 1) + k - 1 - ((o - 1) * s + 1) - before))
    # groups: within each group, in and out swapped (kernel (KH, KW, O / G, C), same group count)
    w_t = lax.rev(w, (0, 1)).reshape(kh, kw, cin_g, groups, cout // groups)
    w_t = jnp.transpose(w_t, (0, 1, 4, 3, 2)).reshape(kh, kw, cout // groups, groups * cin_g).astype(g.dtype)
    dx = lax.conv_general_dilated(g, w_t, window_strides=lhs_dil, padding=pads_x, lhs_dilation=strides,
                                  dimension_numbers=_DN, feature_group_count=groups, precision=precision,
                                  preferred_element_type=pet)
    if groups != 1:
        # grouped kernels (the library's are constant FIR filters): jax's own kernel gradient
        _, vjp_w = jax.vjp(lambda w_: lax.conv_general_dilated(
            x, w_, strides, pads, lhs_dilation=lhs_dil, dimension_numbers=_DN, feature_group_count=groups,
            precision=precision, preferred_element_type=pet), w)
        return dx.astype(x.dtype), vjp_w(g)[0]
    # kernel gradient: window (i, j) of the dilated, padded x against g, as a canonical conv.
    pads_w = []
    for n, d, (lo, hi), s, k, o in zip(x.shape[1:3], lhs_dil, pads, strides, (kh, kw), g.shape[1:3]):
        full = (n - 1) * d + 1 + lo + hi            # padded, dilated input length
        extra = full - ((o - 1) * s + 1) + 1 - k    # trailing rows the strided windows never reach
        pads_w.append((lo, hi - extra))
    dw = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)).astype(g.dtype), jnp.transpose(g, (1, 2, 0, 3)),
        window_strides=(1, 1), padding=pads_w, lhs_dilation=lhs_dil, rhs_dilation=strides,
        dimension_numbers=_DN, precision=precision, preferred_element_type=pet)
    dw = jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)
    return dx.astype(x.dtype), dw


_conv.defvjp(_conv_fwd, _conv_bwd)
