r"""Batched linear algebra on the small k x k matrices of the phase space (k = the family's order).

``inv``, ``solve`` and ``solve_triangular`` for stacks of k x k matrices, written as unrolled elementwise jnp
code for k <= :data:`SMALL_K` (every family here) and passed to ``jnp.linalg`` / ``jax.scipy.linalg`` above.

Why not LAPACK: on jaxlib 0.10 XLA:CPU runs independent operations of one program concurrently on its
intra-op thread pool, and the batched LAPACK kernels (LU, triangular solve) split their batch over the same
pool and block until the parts are done. Two such kernels at once on a pool of 2 threads (a 2-core machine)
each hold a thread and wait for parts that no free thread can run: the program never finishes (0 % CPU). A
two-solve program reproduces it in about half of its runs, and ``--xla_cpu_multi_thread_eigen=false`` does
not prevent it. For k <= 8 the elementwise form is also faster than a LAPACK call per matrix.

* :func:`solve_triangular`: forward (lower) or back (upper) substitution,
  x_i = (b_i - \sum_{j<i} A_ij x_j) / A_ii (lower; the mirror for upper; ``trans`` solves A^T x = b);
* :func:`solve`, :func:`inv`: Gauss-Jordan elimination with partial pivoting on [A | B] (B = I for ``inv``):
  at column j the row of largest |A_pj| (p >= j) is swapped into row j, divided by its pivot and subtracted
  from every other row, leaving [I | A^{-1} B].

Not covered: the QR factorisation in ``sdes.base.tri_factor`` (the traced Cholesky factors) still calls LAPACK.

Products (:func:`matmul`, :func:`einsum`, :func:`tensordot`) run at ``Precision.HIGHEST``. At the default
precision XLA multiplies float32 operands in TensorFloat-32 on NVIDIA Ampere and later GPUs and in bfloat16
passes on TPUs, about 10 and 8 bits of mantissa: the phase-space arithmetic (k x k mixing of states, the
transition, square-root and mixture tables, the DCT of a modal family) is validated in float32 against float64
to ~1e-6 and would be off by ~1e-3 there. These products are tiny next to a network's, so the full
precision costs nothing measurable; the networks' own layers keep the default (the user's choice).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

Array = Any

PRECISION = jax.lax.Precision.HIGHEST


def matmul(a: Array, b: Array) -> Array:
    """a @ b at full float32 precision on every backend (see the module docstring)."""
    return jnp.matmul(a, b, precision=PRECISION)


def einsum(subscripts: str, *operands: Array) -> Array:
    """jnp.einsum at full float32 precision on every backend."""
    return jnp.einsum(subscripts, *operands, precision=PRECISION)


def tensordot(a: Array, b: Array, axes: Any = 2) -> Array:
    """jnp.tensordot at full float32 precision on every backend."""
    return jnp.tensordot(a, b, axes=axes, precision=PRECISION)


def matmul_xp(a: Array, b: Array, xp: Any) -> Array:
    """a @ b for code shared by the host float64 path (xp = numpy) and the traced one (xp = jnp)."""
    return a @ b if xp is np else matmul(a, b)


# the largest k written out elementwise (the work grows as k^3 unrolled operations)
SMALL_K = 8


def solve_triangular(a: Array, b: Array, *, lower: bool, trans: bool = False) -> Array:
    """x with A x = b (``trans``: A^T x = b); a (..., k, k) triangular, b (..., k, c); batch axes broadcast."""
    k = a.shape[-1]
    if k > SMALL_K:
        shape = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return jsl.solve_triangular(jnp.broadcast_to(a, shape + a.shape[-2:]),
                                    jnp.broadcast_to(b, shape + b.shape[-2:]), lower=lower, trans=int(trans))
    m = jnp.swapaxes(a, -1, -2) if trans else a
    forward = lower != trans                        # the matrix actually solved with is lower triangular
    xs: list[Array] = [None] * k
    for i in (range(k) if forward else range(k - 1, -1, -1)):
        acc = b[..., i, :]
        for j in (range(i) if forward else range(i + 1, k)):
            acc = acc - m[..., i, j, None] * xs[j]
        xs[i] = acc / m[..., i, i, None]
    return jnp.stack(xs, axis=-2)


def solve(a: Array, b: Array) -> Array:
    """x with A x = B; a (..., k, k), b (..., k, c); batch axes broadcast."""
    k = a.shape[-1]
    if k > SMALL_K:
        return jnp.linalg.solve(a, b)
    shape = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    dtype = jnp.result_type(a, b)
    m = jnp.concatenate([jnp.broadcast_to(a, shape + a.shape[-2:]).astype(dtype),
                         jnp.broadcast_to(b, shape + b.shape[-2:]).astype(dtype)], axis=-1)
    rows = jnp.arange(k)
    for j in range(k):
        # partial pivoting: bring the row p >= j of largest |m_pj| to row j
        col = jnp.where(rows >= j, jnp.abs(m[..., :, j]), -1.0)
        p = jnp.argmax(col, axis=-1)
        row_p = jnp.take_along_axis(m, p[..., None, None], axis=-2)[..., 0, :]
        row_j = m[..., j, :]
        at_p = (rows == p[..., None])[..., :, None]
        at_j = (rows == j)[:, None]
        m = jnp.where(at_j, row_p[..., None, :], jnp.where(at_p, row_j[..., None, :], m))
        # eliminate column j from every other row
        row = m[..., j, :] / m[..., j, j, None]
        factor = jnp.where(rows == j, 0.0, m[..., :, j])
        m = m - factor[..., :, None] * row[..., None, :]
        m = jnp.where(at_j, row[..., None, :], m)
    return m[..., :, k:]


def inv(a: Array) -> Array:
    """A^{-1} for a (..., k, k)."""
    k = a.shape[-1]
    if k > SMALL_K:
        return jnp.linalg.inv(a)
    return solve(a, jnp.eye(k, dtype=a.dtype))

