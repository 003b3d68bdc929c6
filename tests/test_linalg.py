"""diffusion_jax.linalg: the small-matrix solves against float64 numpy, and no LAPACK solve or LU kernel left in
the program that deadlocked XLA:CPU (two batched triangular solves at once on a 2-thread pool, see the module
docstring)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import exact, linalg, sdes
from diffusion_jax.param import square_root
from diffusion_jax.training import losses


@pytest.mark.parametrize("k", [1, 2, 3, 6, 9])
def test_solves_match_numpy_in_float64(k):
    rng = np.random.default_rng(k)
    a, b = rng.normal(size=(5, 4, k, k)), rng.normal(size=(5, 4, k, 3))
    low = np.tril(a) + 3 * np.eye(k)
    with jax.enable_x64(True):
        for lower in (True, False):
            m = low if lower else np.swapaxes(low, -1, -2)
            for trans in (False, True):
                op = np.swapaxes(m, -1, -2) if trans else m
                got = linalg.solve_triangular(jnp.asarray(m), jnp.asarray(b), lower=lower, trans=trans)
                np.testing.assert_allclose(got, np.linalg.solve(op, b), rtol=1e-10, atol=1e-12)
        # one matrix for the whole batch (broadcast)
        got = linalg.solve_triangular(jnp.asarray(low[0, 0]), jnp.asarray(b), lower=True)
        np.testing.assert_allclose(got, np.linalg.solve(low[0, 0], b), rtol=1e-10, atol=1e-12)
        pivot = a.copy()
        if k > 1:
            pivot[..., 0, 0] = 0.0        # no LU without row exchanges
        for mat in (a, pivot):
            np.testing.assert_allclose(linalg.inv(jnp.asarray(mat)), np.linalg.inv(mat), rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(linalg.solve(jnp.asarray(mat), jnp.asarray(b)), np.linalg.solve(mat, b),
                                       rtol=1e-8, atol=1e-10)


def _lapack_solves(fn, *args) -> list[str]:
    """LAPACK triangular-solve / LU custom calls in the lowered program (QR, for the Cholesky factors, remains)."""
    hlo = jax.jit(fn).lower(*args).as_text()
    return [line.strip()[:120] for line in hlo.splitlines()
            if "custom_call" in line and "lapack" in line and any(s in line for s in ("trsm", "getrf", "getrs"))]


@pytest.mark.parametrize("objective,weighting", [("dsm", "likelihood"), ("hsm", "likelihood")])
def test_losses_and_exact_eps_use_no_lapack_solve(objective, weighting):
    """The compiled DSM/HSM loss with the exact mixture eps (CD-HOLD n = 3, K = L: the case that deadlocked;
    the loss's and the mixture's solves and inverses in one program) calls no LAPACK solve or LU kernel."""
    sde = sdes.make("cdhold", n=3)
    sqrt = square_root(sde, "L")
    mix = exact.GaussianMixture.create(np.full((1, 4), 0.3), 0.25)
    x0 = jnp.zeros((16, 4))

    def loss(key, x0):
        return losses.score_matching_loss(lambda u, t: exact.mixture_eps(sde, mix, u, t, sqrt), sde, sqrt, key,
                                          x0, objective=objective, weighting=weighting)[0]
    assert _lapack_solves(loss, jax.random.PRNGKey(0), x0) == []

