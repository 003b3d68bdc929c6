"""The linear core against independent float64 computations (ODE quadrature of the moment equations)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sdes
from reference import moments_by_ode

TIMES = [1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
FAMILIES = [("vp", {}), ("ve", {}), ("cld", {}), ("psld", {}), ("told", {}),
            ("hold", dict(g=(1.0, 0.7, 2.0), xi=1.5))] + [("cdhold", dict(n=n)) for n in range(1, 9)]
IDS = [f"{n}-{'-'.join(str(v) for v in p.values())}" if p else n for n, p in FAMILIES]


def _phi_tolerance(sde, phi_ref, b):
    """1e-5 of each entry's local scale |Phi_ij| + |B dPhi_ij/dB| (relative, except at zero crossings)."""
    return 1e-5 * (np.abs(phi_ref) + np.abs(b * sde.A @ phi_ref))


@pytest.mark.parametrize("name,params", FAMILIES, ids=IDS)
def test_transition_and_covariance_match_float64_ode(name, params):
    sde = sdes.make(name, **params)
    ts = jnp.asarray(TIMES + [sde.T], jnp.float32)
    phi, sigma, chol = jax.jit(lambda t: (sde.transition(t=t, s=0.0), sde.covariance(t), sde.cholesky(t)))(ts)
    assert phi.dtype == jnp.float32 and sigma.dtype == jnp.float32
    phi, sigma, chol = (np.asarray(a, np.float64) for a in (phi, sigma, chol))
    for i, t in enumerate(np.asarray(ts, np.float64)):
        b = float(sde.schedule.integral(t, np))
        phi_ref, sigma_ref = moments_by_ode(sde.A, sde.Q, sde.sigma0, b)
        d = np.sqrt(np.diag(sigma_ref))
        scale = np.outer(d, d)
        assert np.all(np.abs(sigma[i] - sigma_ref) <= 1e-5 * scale), (t, np.abs(sigma[i] - sigma_ref) / scale)
        llt = chol[i] @ chol[i].T
        assert np.all(np.abs(llt - sigma_ref) <= 1e-5 * scale), (t, np.abs(llt - sigma_ref) / scale)
        assert np.allclose(np.triu(chol[i], 1), 0) and np.all(np.diag(chol[i]) > 0)
        tol = _phi_tolerance(sde, phi_ref, b)
        assert np.all(np.abs(phi[i] - phi_ref) <= tol), (t, np.abs(phi[i] - phi_ref) / tol)


@pytest.mark.parametrize("name,params", [("cld", {}), ("cdhold", dict(n=5)), ("cdhold", dict(n=8)), ("vp", {})])
@pytest.mark.parametrize("s,t", [(0.3, 0.7), (0.01, 0.99)])
def test_transition_between_times_and_backwards(name, params, s, t):
    """Phi(t, s) and Phi(s, t) against dPhi/dB = +-A Phi integrated in float64, both in float32 and on the host.

    The backward reference is its own ODE solve, not the inverse of the forward one: Phi(t, s) is ill-conditioned
    for the higher orders (condition ~5e12 for cdhold n = 8 over B = 3.9), so a float64 inverse is itself off
    by 5e-5, and a float32 one is off by O(1).
    """
    sde = sdes.make(name, **params)
    b = float(sde.schedule.integral(t, np) - sde.schedule.integral(s, np))
    zero = np.zeros_like(sde.Q)
    phi_ref, _ = moments_by_ode(sde.A, zero, zero, b)
    back_ref, _ = moments_by_ode(-sde.A, zero, zero, b)
    fwd = np.asarray(sde.transition(t=t, s=s), np.float64)
    back = np.asarray(sde.transition(t=s, s=t), np.float64)
    assert np.all(np.abs(fwd - phi_ref) <= _phi_tolerance(sde, phi_ref, b))
    assert np.all(np.abs(back - back_ref) <= _phi_tolerance(sde, back_ref, b)), np.abs(back - back_ref).max()
    host = sde.transition_np(t=s, s=t)
    assert np.all(np.abs(host - back_ref) <= 1e-2 * _phi_tolerance(sde, back_ref, b))   # float64: the ODE's own error


def test_grad_of_covariance_matches_moment_equation():
    """d Sigma / dt = beta(t) (A Sigma + Sigma A^T + Q), through jax.grad of the float32 core."""
    sde = sdes.make("cdhold", n=3)
    for t in [1e-3, 0.05, 0.6]:
        jac = np.asarray(jax.jacfwd(sde.covariance)(jnp.float32(t)), np.float64)
        b = float(sde.schedule.integral(t, np))
        _, s = moments_by_ode(sde.A, sde.Q, sde.sigma0, b)
        ref = sde.schedule.beta(np.float64(t), np) * (sde.A @ s + s @ sde.A.T + sde.Q)
        assert np.allclose(jac, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max()), (t, jac, ref)


def test_vmap_matches_batched_call():
    sde = sdes.make("psld")
    ts = jnp.linspace(1e-3, 1.0, 7)
    assert np.allclose(jax.vmap(sde.covariance)(ts), sde.covariance(ts), rtol=1e-6, atol=1e-9)
    assert sde.covariance(ts.reshape(7, 1)).shape == (7, 1, 2, 2)


def test_ve_marginal_variance_closed_form():
    sde = sdes.make("ve", sigma_min=0.01, sigma_max=50.0)
    for t in TIMES:
        exact = 0.01 ** 2 * ((50.0 / 0.01) ** (2 * t) - 1.0)
        assert abs(float(sde.covariance(t)[0, 0]) / exact - 1) < 1e-5
    assert np.isclose(sde.prior_covariance[0, 0], 50.0 ** 2 - 0.01 ** 2, rtol=1e-10)


def test_vp_marginal_closed_form():
    sde = sdes.make("vp")
    for t in TIMES:
        b = 0.1 * t + 0.5 * 19.9 * t * t
        assert abs(float(sde.transition(t=t, s=0.0)[0, 0]) - np.exp(-0.5 * b)) < 1e-6
        assert abs(float(sde.covariance(t)[0, 0]) / (-np.expm1(-b)) - 1) < 1e-5


@pytest.mark.parametrize("name,params", [("vp", {}), ("cld", {}), ("told", {}), ("cdhold", dict(n=5))],
                         ids=["vp", "cld", "told", "cdhold-5"])
def test_host_tables_take_arrays_of_times(name, params):
    """The float64 host twins at a (2, 4) array of times: t's shape in front, and every entry against the
    float64 moment ODE (Sigma to 1e-9 of sqrt(Sigma_ii Sigma_jj), Phi to 1e-9 of its local scale); K_t of both
    square roots reproduces Sigma_t (L to 1e-9; R = L U to 1e-4 only: the cubic Hermite interpolant of U between
    its float64 nodes is orthogonal to O((h |t S(t)|)^4), largest near T: max |U U^T - I| with 64 nodes per octave
    is 2.2e-7 (CLD), 1.2e-6 (TOLD), 1.3e-5 (CD-HOLD n = 4), 6.7e-5 (n = 5), all at t = 0.96). The samplers' tables evaluate whole quadratures this way."""
    from diffusion_jax.param.roots import square_root
    sde = sdes.make(name, **params)
    k = sde.order
    ts = np.array([[1e-4, 1e-3, 0.05, 0.3], [0.5, 0.7, 0.9, 1.0]])
    phi, sigma, chol = sde.transition_np(t=ts, s=0.0), sde.covariance_np(ts), sde.cholesky_np(ts)
    back = sde.transition_np(t=0.02, s=ts)                   # a scalar against an array broadcasts
    roots = [square_root(sde, kind).np(ts) for kind in ("R", "L")]
    for a in (phi, sigma, chol, back, *roots):
        assert a.shape == ts.shape + (k, k)
    assert np.shape(sde.noise_level_np(ts)) == ts.shape and isinstance(sde.noise_level_np(0.5), float)
    for idx in np.ndindex(ts.shape):
        b = float(sde.schedule.integral(ts[idx], np))
        phi_ref, sigma_ref = moments_by_ode(sde.A, sde.Q, sde.sigma0, b)
        d = np.sqrt(np.diag(sigma_ref))
        scale = np.outer(d, d)
        assert np.all(np.abs(sigma[idx] - sigma_ref) <= 1e-9 * scale), (ts[idx], np.abs(sigma[idx] - sigma_ref) / scale)
        assert np.all(np.abs(phi[idx] - phi_ref) <= 1e-4 * _phi_tolerance(sde, phi_ref, b)), ts[idx]
        for r, tol in zip(roots, (1e-4, 1e-9)):
            assert np.all(np.abs(r[idx] @ r[idx].T - sigma_ref) <= tol * scale), ts[idx]
        assert np.isclose(sde.noise_level_np(ts)[idx], np.sqrt(sigma_ref[0, 0]) / phi_ref[0, 0], rtol=1e-9)
        b_back = float(sde.schedule.integral(0.02, np)) - b
        back_ref = moments_by_ode(sde.A if b_back > 0 else -sde.A, 0 * sde.Q, 0 * sde.Q, abs(b_back))[0]
        assert np.all(np.abs(back[idx] - back_ref) <= 1e-2 * _phi_tolerance(sde, back_ref, abs(b_back))), ts[idx]
