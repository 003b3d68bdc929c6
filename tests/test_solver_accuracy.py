"""gDDIM in both forms (samplers.gddim, samplers.exponential) and the measured defaults (samplers.defaults).

* single data point: every order 0..3 at every NFE 1..20, in the eps form and in the denoiser form (with a
  corrector of degree q + 1 at NFE 2, 3, 5, 8, 13, 20), and the defaults through ``sample``, ends within 1e-4
  (relative, float32) of a float64 Radau solve of the exact probability-flow ODE for vp, cld, psld, told and
  cdhold n = 4, 5, 6;
* convergence orders on exact mixture scores (CLD, T -> 0.1): disjoint slope windows per order and a
  fixed-NFE error ratio between consecutive orders;
* the defaults: ``sample(method="gddim", nfe=N)`` with nothing chosen runs the denoiser form with the stored
  configuration and its eps-error gain bound (every stored grid within its bound, recomputed here); the eps
  form on request; the fallback rules.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import exact, sdes
from diffusion_jax.exact import exact_eps_fn
from diffusion_jax.param import Model, square_root
from diffusion_jax.samplers import defaults, exponential, gddim, prior_init, sample, time_grid
from diffusion_jax.samplers.plan import _layout
from test_samplers import X_STAR, dirac_denoiser

T_END = 1e-3
SINGLE_POINT_FAMS = [("vp", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4}), ("cdhold", {"n": 5}),
                     ("cdhold", {"n": 6})]
SINGLE_POINT_TOL = 1e-4          # relative to max |u| of the float64 reference endpoint, float32 run
CORRECTOR_NFES = (2, 3, 5, 8, 13, 20)


N_MAX = 20
EPS_KEYS = ("t", "coef", "zcoef", "m_next", "r_next", "w", "w_hat", "kz", "kt", "s_inv")


def _padded_tables(sde, nfe, order, corrector, form):
    """The float32 tables of one run, padded to N_MAX rows by no-op steps at t_0 placed first (u -> m D + R eps
    = u; their D/eps enter the history only in slots whose coefficients are zero), and to the widest history.
    form "single": the single-step method with ``order`` stages per step (fractions: defaults when
    ``corrector`` < 0, else skewed ones)."""
    sqrt = square_root(sde, "R")
    if form == "single":
        layout, fr = _layout(nfe, order, None)
        if corrector >= 0:
            fr = tuple(tuple(0.8 * r ** 2 + 0.1 for r in f) for f in fr)
        grid = tuple(float(t) for t in time_grid(sde, len(layout), "power", t_end=T_END, rho=3.0))
        tab = exponential.single_step_tables(sde, sqrt, grid, layout, fr)
    else:
        grid = tuple(float(t) for t in time_grid(sde, nfe, "power", t_end=T_END, rho=4.0))
    if form in ("denoiser", "single"):
        if form == "denoiser":
            tab = exponential.step_tables(sde, sqrt, grid, order, corrector)
        tab = {k: tab[k] for k in exponential.SCAN_KEYS}
        widths = {"v": 6, "zv": 6, "g": 6}
        noop = dict(m_next=tab["m_next"][:1] * 0 + sde.transition_np(t=grid[0], s=0.0)[..., :, 0], b=sqrt.np(grid[0])[None])
    else:
        tab = dict(gddim.gddim_coefficients(sde, sqrt, grid, order, 0.0), t=np.asarray(grid[:-1]))
        tab = {k: tab[k] for k in EPS_KEYS}
        widths = {"coef": 4, "zcoef": 4}
        noop = dict(m_next=sde.transition_np(t=grid[0], s=0.0)[..., :, 0][None], r_next=sqrt.np(grid[0])[None])
    out = {}
    for k, v in tab.items():
        if k in widths:
            v = np.concatenate([v, np.zeros((v.shape[0], widths[k] - v.shape[1]) + v.shape[2:])], axis=1)
        pad = noop.get(k, v[:1] * (0 if k in widths else 1))   # zero weights; t_0's own conversions
        out[k] = np.concatenate([np.repeat(pad, N_MAX - nfe, axis=0), v], axis=0).astype(np.float32)
    return out


@functools.lru_cache(maxsize=None)
def _runners(sde):
    """Per form: every case at once (vmap over stacked padded tables, scan over N_MAX rows); compiled once."""
    model = Model(sde, dirac_denoiser, "denoiser", "R")

    def den_step(carry, row):
        u, c, z, hist, base = carry
        eps, d = model.carried(u, row["t"], c, z, row)
        _, u, c, z, hist, base = exponential.multistep_step(sde, row, u, c, z, eps, d, hist, base)
        return (u, c, z, hist, base), None

    def eps_step(carry, row):
        u, c, z, hist = carry
        u, c, z, hist, _ = gddim.gddim_step(sde, model, row["t"], row, u, c, z, hist)
        return (u, c, z, hist), None

    def make(step, hist_shape, base):
        def one(tab, u0):
            c, z = exponential.carried_start(sde, u0, tab["s_inv"][0])
            hist = jnp.zeros(hist_shape(tab, u0), u0.dtype)
            init = (u0, c, z, hist) + ((jnp.zeros_like(u0), jnp.zeros_like(c)),) * base
            return jax.lax.scan(step, init, tab)[0][0]
        return jax.jit(jax.vmap(one, in_axes=(0, None)))
    den = make(den_step, lambda tab, u0: (tab["v"].shape[1],) + u0.shape[:-1], True)
    return {"denoiser": den, "single": den,
            "eps": make(eps_step, lambda tab, u0: (tab["coef"].shape[1],) + u0.shape, False)}


@pytest.mark.parametrize("name,params", SINGLE_POINT_FAMS,
                         ids=[f[0] + str(f[1].get("n", "")) for f in SINGLE_POINT_FAMS])
def test_every_order_is_exact_on_a_single_point_in_float32(name, params):
    """On the exact score of one data point eps is constant along the flow, so every gDDIM order (eps form;
    denoiser form with and without its corrector; single-step with 2 and 3 stages) is exact: in float32 each
    ends within 1e-4 (relative) of a float64 Radau solve of the exact probability-flow ODE, at every NFE 1..20
    (power grid, rho = 4; single-step rho = 3, default and skewed stage fractions)."""
    sde = sdes.make(name, **params)
    fid = name + str(params.get("n", ""))
    with np.load(os.path.join(os.path.dirname(__file__), "fixtures", "single_point_reference.npz")) as f:
        stored = fid + "/ref" in f
        if stored:   # golden float64 Radau endpoints (fixtures/make_single_point_reference.py)
            u0, ref = jnp.asarray(f[fid + "/u0"]), f[fid + "/ref"]
    if not stored:
        # CD-HOLD n = 5, 6: the Radau solve takes > 6 CPU-minutes each (not stored); the float64 exact map
        # u = m_t x* + R_t R_T^{-1} (u_T - m_T x*) instead (R_t checked against Sigma_t in test_param)
        assert fid in ("cdhold5", "cdhold6"), f"no stored reference for {fid}: run the fixture script"
        u0 = prior_init(sde, jax.random.PRNGKey(0), 3, (2,))
        sq = square_root(sde, "R")
        m_of = lambda t: sde.transition_np(t=t, s=0.0)[:, 0]
        r0 = np.asarray(u0, np.float64) - X_STAR * m_of(sde.T)
        ref = X_STAR * m_of(T_END) + np.einsum("ij,...j->...i", sq.np(T_END) @ np.linalg.inv(sq.np(sde.T)), r0)
    scale = np.abs(ref).max()
    runners = _runners(sde)
    worst = {}
    for form in ("eps", "denoiser", "single"):
        if form == "single":     # (nfe, stages per step, default (-1) or skewed (0) fractions)
            cases = [(nfe, st, c) for nfe in range(1, N_MAX + 1) for st in (2, 3)
                     for c in ((-1, 0) if nfe in CORRECTOR_NFES else (-1,))]
        else:
            cases = [(nfe, q, c) for nfe in range(1, N_MAX + 1) for q in range(min(3, nfe - 1) + 1)
                     for c in ((-1, q + 1) if form == "denoiser" and nfe in CORRECTOR_NFES else (-1,))]
        tabs = [_padded_tables(sde, nfe, q, c, form) for nfe, q, c in cases]
        stacked = {k: jnp.asarray(np.stack([t[k] for t in tabs])) for k in tabs[0]}
        u = np.asarray(runners[form](stacked, u0), np.float64)
        errs = np.abs(u - ref).reshape(len(cases), -1).max(axis=1) / scale
        worst[form] = float(errs.max())
        bad = [(case, float(e)) for case, e in zip(cases, errs) if not e <= SINGLE_POINT_TOL]
        assert not bad, (form, "(nfe, order, corrector), error", bad[:8])
    # the public entry point (the compiled scans; the denoiser form with its tuned defaults) keeps it too
    for kw in (dict(), dict(predict="denoiser", max_gain=float("inf")), dict(predict="eps", order=3),
               dict(stages=3), dict(stages=(2, 3, 3, 2), fractions=((0.9,), (0.1, 0.2), (0.5, 0.6), (0.3,)))):
        u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END, **kw)
        err = np.abs(np.asarray(u, np.float64) - ref).max() / scale
        assert info.nfe == 10 and err <= SINGLE_POINT_TOL, (info.config, err)
    print(name, params, "worst relative error per form", worst)


@pytest.fixture(scope="module")
def cld_smooth():
    sde = sdes.make("cld")
    fn = exact_eps_fn(sde, exact.ring_of_gaussians())
    u0 = prior_init(sde, jax.random.PRNGKey(0), 32, (2,))
    ref, _ = sample(sde, fn, u0, method="dopri5", rtol=1e-8, atol=1e-8, t_end=0.1)
    return sde, fn, u0, ref, {}


def _error(problem, nfe, order, corrector):
    sde, fn, u0, ref, cache = problem
    if (nfe, order, corrector) not in cache:
        u, _ = sample(sde, fn, u0, method="gddim", nfe=nfe, t_end=0.1, grid="uniform", predict="denoiser",
                      order=order, corrector=corrector)
        cache[(nfe, order, corrector)] = float(jnp.mean(jnp.linalg.norm(u - ref, axis=(1, 2))))
    return cache[(nfe, order, corrector)]


# (order, corrector) -> a window around the expected global order (q + 1; q + 2 with a corrector of degree
# q + 1) that excludes the neighbouring orders' windows. Measured slopes (64 -> 128): 0.99, 1.93, 2.92, 3.74.
ORDER_CASES = [((0, -1), (0.8, 1.4)), ((1, -1), (1.6, 2.4)), ((2, -1), (2.5, 3.3)), ((3, -1), (3.4, 4.6)),
               ((1, 2), (2.5, 3.3))]


@pytest.mark.parametrize("oc,window", ORDER_CASES, ids=[f"q{o}c{c}" for (o, c), _ in ORDER_CASES])
def test_convergence_order_windows(cld_smooth, oc, window):
    """Slope of log err vs log NFE in the smooth regime (CLD, T -> 0.1, 8-Gaussian ring, exact scores)."""
    errs = [_error(cld_smooth, n, *oc) for n in (64, 128)]
    slope = -np.log(errs[1] / errs[0]) / np.log(2.0)
    assert window[0] <= slope <= window[1], (oc, errs, slope)


# stages -> (NFEs, window): 2 stages are of order 2, 3 of order 3 (measured slopes 1.92 at 64 -> 128 and 2.90
# at 33 -> 66; the windows are ORDER_CASES' for orders 2 and 3, disjoint from the neighbouring orders')
SINGLE_STEP_CASES = [(2, (64, 128), (1.6, 2.4)), (3, (33, 66), (2.5, 3.3))]


@pytest.mark.parametrize("stages,nfes,window", SINGLE_STEP_CASES, ids=["s2", "s3"])
def test_single_step_convergence_order(cld_smooth, stages, nfes, window):
    """Single-step exponential RK (default stage fractions, uniform grid): slope of log err vs log NFE in its
    order's window (the wrong stage base, weights or interpolant would drop it), smooth regime as above."""
    sde, fn, u0, ref, _ = cld_smooth
    errs = []
    for nfe in nfes:
        u, info = sample(sde, fn, u0, method="gddim", nfe=nfe, t_end=0.1, grid="uniform", stages=stages)
        assert info.nfe == nfe and info.config["stages"] == (stages,) * (nfe // stages)
        errs.append(float(jnp.mean(jnp.linalg.norm(u - ref, axis=(1, 2)))))
    slope = -np.log(errs[1] / errs[0]) / np.log(nfes[1] / nfes[0])
    assert window[0] <= slope <= window[1], (stages, errs, slope)


def test_higher_order_is_more_accurate_at_fixed_nfe(cld_smooth):
    errs = [_error(cld_smooth, 64, q, -1) for q in range(4)]
    for q in range(3):
        assert errs[q + 1] < errs[q] / 1.5, errs
    assert _error(cld_smooth, 64, 1, 2) < errs[1] / 1.5      # the corrector raises the order at no NFE


def test_defaults_come_from_the_stored_table():
    table = defaults.load_table()
    assert table["entries"], "the tuned table is empty: run python -m diffusion_jax bench-solvers --tune"
    sde = sdes.make("cld")
    entry = table["entries"][defaults.family_key(sde)]
    for nfe, e in entry.items():
        s = np.asarray(e["s"])
        assert len(s) == int(nfe) + 1 and s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
        assert 0 <= e["order"] <= min(3, int(nfe) - 1) and -1 <= e["corrector"] <= 4
    e = entry["10"]
    cfg = defaults.gddim_defaults(sde, 10, sde.T, T_END)
    expect = defaults.power_grid(np.asarray(e["s"]), e["rho"], sde.T, T_END)
    assert np.allclose(cfg["ts"], expect, rtol=1e-12) and cfg["order"] == e["order"]
    assert cfg["max_gain"] == e["max_gain"] == defaults.gain_at(table["setup"]["max_gain"], 10)
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (2,))
    # nothing chosen: the denoiser form with the stored configuration and bound (the stored grid is already
    # within its bound, so the plan's guard leaves it as stored)
    u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END)
    assert info.config["predict"] == "denoiser" and info.config["max_gain"] == e["max_gain"]
    assert np.allclose(info.ts, expect, rtol=1e-9)
    assert info.config["order"] == e["order"] and info.config["corrector"] == e["corrector"]
    # an explicit choice overrides only what it names
    _, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END, order=1)
    assert info.config["order"] == 1 and np.allclose(info.ts, expect, rtol=1e-9)
    assert info.config["max_gain"] == e["max_gain"] and info.config["predict"] == "denoiser"
    _, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END,
                     max_gain=float("inf"))
    assert info.config["order"] == e["order"] and np.isinf(info.config["max_gain"])
    # the eps form on request (order 1, uniform grid), and with noise (lam > 0) where it is the only form
    _, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END,
                     predict="eps")
    assert info.config == dict(order=1, corrector=-1, predict="eps", grid="uniform")
    _, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END, lam=1.0,
                     key=jax.random.PRNGKey(1))
    assert info.config["predict"] == "eps"


def _step_gain(sde, t, t_next):
    """|m_{t_next}| / |R_t^{-1} m_t| from the Cholesky factor of Sigma_t (|w| is the same for every root)."""
    m = lambda s: sde.transition_np(t=s, s=0.0)[:, 0]
    w = np.linalg.solve(np.linalg.cholesky(sde.covariance_np(t)), m(t))
    return np.linalg.norm(m(t_next)) / np.linalg.norm(w)


def test_stored_grids_are_within_their_gain_bound():
    """The tuner measured every candidate under the bound (bench-solvers --tune): each stored grid's steps
    (all but the last, which the guard never moves) have eps-error gain <= the entry's max_gain, and that
    bound is the one the table's first run or one of its retunes (its ``commands``) gives that NFE."""
    from diffusion_jax.apps.bench_solvers import parse_gain
    table = defaults.load_table()
    assert table["setup"]["max_gain"] is not None
    specs = [table["setup"]["max_gain"]] + [parse_gain(c.split("--max-gain ")[1].split()[0])
                                            for c in table["commands"] if "--max-gain " in c]
    names = {"vp": ("vp", {}), "cld": ("cld", {}), "psld": ("psld", {}), "told": ("told", {}),
             "cdhold": ("cdhold", {"n": 4})}
    for name, params in names.values():
        sde = sdes.make(name, **params)
        entry = table["entries"][defaults.family_key(sde)]
        assert {"5", "10", "20", "50"} <= set(entry), (name, sorted(entry))
        for nfe, e in entry.items():
            bound = e["max_gain"]
            assert 0 < bound < np.inf and any(defaults.gain_at(sp, int(nfe)) == bound for sp in specs), (
                name, nfe, bound)
            ts = defaults.power_grid(np.asarray(e["s"]), e["rho"], sde.T, T_END)
            gains = [_step_gain(sde, ts[i], ts[i + 1]) for i in range(len(ts) - 2)]
            # 1e-5: the R root and the Cholesky factor of a near-singular Sigma (cond 4e7 for cdhold4 at
            # t = 1e-3) agree on |w| to ~1e-6 relative in float64; an unguarded grid exceeds the bound by far more
            assert max(gains) <= bound * (1 + 1e-5), (name, nfe, max(gains))


def test_default_fallbacks():
    cld = sdes.make("cld")
    stored = sorted(int(k) for k in defaults.load_table()["entries"][defaults.family_key(cld)])
    # another NFE of a stored family: the nearest stored profile, resampled, still spans [t_end, T]
    cfg = defaults.gddim_defaults(cld, 7, cld.T, T_END)
    assert len(cfg["ts"]) == 8 and cfg["ts"][0] == cld.T and cfg["ts"][-1] == T_END
    assert np.all(np.diff(cfg["ts"]) < 0) and f"nfe={min(stored, key=lambda k: abs(np.log(k / 7)))}" in cfg["source"]
    # a family (or parameters) never tuned: the generic power rule
    other = sdes.make("cld", beta=2.0)
    cfg = defaults.gddim_defaults(other, 12, other.T, T_END)
    assert cfg["source"] == "generic" and cfg["order"] == defaults.GENERIC["order"]
    assert np.isinf(cfg["max_gain"])        # the bound is tuned per family: none for an untuned one
    assert np.allclose(cfg["ts"], time_grid(other, 12, "power", t_end=T_END, rho=defaults.GENERIC["rho"]))
    # orders are capped by the history the NFE allows
    cfg = defaults.gddim_defaults(cld, 2, cld.T, T_END)
    assert cfg["order"] <= 1 and cfg["corrector"] <= 1


def test_bad_gddim_options():
    sde = sdes.make("cld")
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (2,))
    fn = lambda u, t: jnp.zeros_like(u)
    with pytest.raises(ValueError, match="predict must be one of"):
        sample(sde, fn, u0, method="gddim", nfe=5, predict="x0")
    with pytest.raises(ValueError, match="use predict='eps' for lam > 0"):
        sample(sde, fn, u0, method="gddim", nfe=5, predict="denoiser", lam=0.5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="corrector must be an integer in -1..4"):
        sample(sde, fn, u0, method="gddim", nfe=5, corrector=7, predict="denoiser")
    with pytest.raises(ValueError, match="corrector needs predict='denoiser'"):
        sample(sde, fn, u0, method="gddim", nfe=5, predict="eps", corrector=2)
    with pytest.raises(ValueError, match="unknown interpolation variable"):
        exponential.denoiser_coefficients(sde, square_root(sde, "R"), (1.0, 0.5, 0.1), 1, -1, "sigma")
    # single-step options
    with pytest.raises(ValueError, match=r"gddim stages must be in 1..3"):
        sample(sde, fn, u0, method="gddim", nfe=8, stages=4)
    with pytest.raises(ValueError, match="sum to nfe=8"):
        sample(sde, fn, u0, method="gddim", nfe=8, stages=(3, 3))
    with pytest.raises(ValueError, match="order and corrector are the multistep options"):
        sample(sde, fn, u0, method="gddim", nfe=8, stages=2, order=2)
    with pytest.raises(ValueError, match="fractions place the stages"):
        sample(sde, fn, u0, method="gddim", nfe=8, fractions=((0.5,),) * 4)
    with pytest.raises(ValueError, match="stages - 1 increasing numbers in"):
        sample(sde, fn, u0, method="gddim", nfe=4, stages=2, fractions=((0.5,), (1.2,)))
    with pytest.raises(ValueError, match="single-step gddim .* is the denoiser form"):
        sample(sde, fn, u0, method="gddim", nfe=4, stages=2, predict="eps")


def test_benchmark_reference_is_a_float64_solve():
    """bench-solvers' reference (``reference_x64``) on one Gaussian N(mu, s^2 I) under VP, where the
    probability-flow map is affine: x_t = m_t mu + (r_t / r_T) (x_T - m_T mu), r_t^2 = m_t^2 s^2 + 1 - m_t^2,
    m_t = exp(-B(t) / 2), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 (closed form, float64). Measured: the
    float64 solve is 1e-10 off; a float32 one at rtol = atol = 1e-7 1.6e-7."""
    from diffusion_jax.apps.bench_solvers import reference_x64
    sde = sdes.make("vp")
    b0, b1, big_t = float(sde.params["beta_min"]), float(sde.params["beta_max"]), float(sde.T)
    u0 = prior_init(sde, jax.random.PRNGKey(3), 16, (2,))
    x = reference_x64(sde, dict(n=1, radius=1.0, variance=0.01), u0, T_END)
    assert x.dtype == np.float64 and x.shape == (16, 2)
    m = lambda t: np.exp(-(b0 * t + (b1 - b0) * t * t / 2) / 2)
    r = lambda t: np.sqrt(m(t) ** 2 * 0.01 + 1 - m(t) ** 2)
    mu = np.array([1.0, 0.0])
    x_big_t = np.asarray(u0[..., 0], np.float64)
    expect = m(T_END) * mu + r(T_END) / r(big_t) * (x_big_t - m(big_t) * mu)
    np.testing.assert_allclose(x, expect, rtol=0, atol=1e-9)
