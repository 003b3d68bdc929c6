"""The gDDIM square root R_t and the eps / score / denoiser conversions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from diffusion_jax import param, sdes
from reference import moments_by_ode

FAMS = [("vp", {}), ("ve", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4}), ("cdhold", {"n": 5}),
        ("cdhold", {"n": 6})]


@pytest.mark.parametrize("name,params", FAMS, ids=[f[0] + str(f[1].get("n", "")) for f in FAMS])
def test_r_squares_to_sigma(name, params):
    """float32 R_t R_t^T = Sigma_t to 2e-6 of sqrt(Sigma_ii Sigma_jj), at nodes and between them: 0.9945 lies
    inside the last cell of U's table, where |t S(t)| is largest and the cubic interpolant alone was orthogonal
    only to 1.5e-5 (n = 4) ... 2.8e-4 (n = 6); at 3e-5 the n = 6 generator's float64 rounding gave 6e-5."""
    sde = sdes.make(name, **params)
    sq = param.square_root(sde, "R")
    ts = np.array([1e-5, 3e-5, 1e-3, 0.05, 0.37, 0.9, 0.97, 0.9945, 1.0])
    r = np.asarray(sq(jnp.asarray(ts, jnp.float32)), np.float64)
    for i, t in enumerate(ts):
        _, s = moments_by_ode(sde.A, sde.Q, sde.sigma0, float(sde.schedule.integral(t, np)))
        d = np.sqrt(np.diag(s))
        assert np.all(np.abs(r[i] @ r[i].T - s) <= 2e-6 * np.outer(d, d)), (t, np.max(np.abs(r[i] @ r[i].T - s) / np.outer(d, d)))


@pytest.mark.parametrize("n", [5, 6])
def test_r_table_builds_in_seconds_for_high_order_hold(n):
    """The rotation ODE of R = L U is solved by fixed Magnus steps: seconds for CD-HOLD n = 5, 6 (an adaptive
    solver chased the float64 rounding of the generator at t < 1e-4 for minutes); U stays orthogonal."""
    import time
    sde = sdes.make("cdhold", n=n)
    t0 = time.perf_counter()
    sq = param.SquareRoot(sde, "R")
    assert time.perf_counter() - t0 < 20.0
    u = sq._u_tab
    assert np.abs(u @ np.swapaxes(u, -1, -2) - np.eye(n)).max() < 1e-12


def test_r_solves_its_ode():
    """R_t from the table equals an independent float64 solve of dR/dt = (F + 1/2 G G^T Sigma^-1) R."""
    sde = sdes.make("told")
    sq = param.square_root(sde, "R")

    def rhs(t, y):
        beta = sde.schedule.beta(np.float64(t), np)
        s = sde.covariance_np(t)          # checked against the moment ODE in test_sde_core
        m = beta * sde.A + 0.5 * beta * sde.Q @ np.linalg.inv(s)
        return (m @ y.reshape(3, 3)).ravel()

    sol = solve_ivp(rhs, (1.0, 0.05), sq.np(1.0).ravel(), method="Radau", rtol=1e-9, atol=1e-11,
                    t_eval=[0.5, 0.2, 0.05])
    for j, t in enumerate(sol.t):
        assert np.allclose(np.asarray(sq(t), np.float64), sol.y[:, j].reshape(3, 3), rtol=1e-4, atol=1e-5), t


def test_conversions_round_trip():
    sde = sdes.make("psld")
    t = 0.3
    k_t = sde.cholesky(t)            # sample_marginal draws u = m x0 + L z
    m_t = sde.mean_coefficient(t)
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(key1, (4, 5))
    u, z = sde.sample_marginal(key2, x0, t)
    # the true eps of u given x0 is z: the denoiser x0 maps to it and back
    eps = param.eps_from_denoiser(sde, u, x0, m_t, k_t)
    assert np.allclose(eps, z, atol=1e-4)
    assert np.allclose(param.denoiser_from_eps(sde, u, z, m_t, k_t), x0, atol=1e-4)
    s = param.score_from_eps(sde, z, k_t)
    # score of N(m x0, Sigma) at u: -Sigma^{-1}(u - m x0)
    sig = np.asarray(sde.covariance(t), np.float64)
    res = np.asarray(u, np.float64) - np.asarray(x0, np.float64)[..., None] * np.asarray(m_t, np.float64)
    ref = -np.einsum("ij,...j->...i", np.linalg.inv(sig), res)
    assert np.allclose(s, ref, rtol=1e-4, atol=1e-4)
    assert np.allclose(param.eps_from_score(sde, s, k_t), z, atol=1e-4)
    # with R: R eps_R = L z
    r_t = param.square_root(sde, "R")(t)
    eps_r = param.eps_from_denoiser(sde, u, x0, m_t, r_t)
    assert np.allclose(np.einsum("ij,...j->...i", r_t, eps_r), np.einsum("ij,...j->...i", k_t, z), atol=1e-4)


def test_unknown_square_root_and_output():
    sde = sdes.make("cld")
    with pytest.raises(ValueError, match="unknown square root 'Q'"):
        param.SquareRoot(sde, "Q")
    with pytest.raises(ValueError, match="unknown model output 'v'"):
        param.Model(sde, lambda u, t: u, output="v")


def test_equal_families_share_their_tables(monkeypatch):
    """Families are values: two make() calls with the same parameters build the R_t table once."""
    from diffusion_jax.param import roots
    builds = []
    real = roots.SquareRoot._build_r_table
    monkeypatch.setattr(roots.SquareRoot, "_build_r_table", lambda self, *a: (builds.append(self.sde), real(self, *a)))
    roots.square_root.cache_clear()
    a, b = sdes.make("cdhold", n=4, beta=3.5), sdes.make("cdhold", n=4, beta=3.5)
    assert a == b and hash(a) == hash(b)
    assert param.square_root(a, "R") is param.square_root(b, "R")
    assert len(builds) == 1
    c = sdes.make("cdhold", n=4, beta=3.0)                  # another value: its own table
    assert c != a
    param.square_root(c, "R")
    assert len(builds) == 2
    with pytest.raises(AttributeError, match="immutable"):
        a.T = 2.0
