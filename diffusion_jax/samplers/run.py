r"""The integration of every sampler as a pure function of (params, u_init, key, tables).

``runner(sde, apply, plan_statics)`` returns ``run(params, u0, key, tables) -> (u, trajectory, denoised, stats)``,
a function with no array captured: the network enters as ``apply(params, u, t_batch)`` and the plan's
tables as arguments, so ``jax.jit(run)`` compiles once per (method, static options, shapes) and lowers no
weights as constants. Only the family's own small float64 tables (its transition/square-root grids) are
constants of the compiled program.

Formulas (docs/maths.md section 5): probability-flow ODE du/dt = F u - 1/2 G G^T s; reverse SDE
du = [F u - G G^T s] dt + G dW-bar; gDDIM's exponential step in eps; SSCS's symmetric splitting; EDM-Heun in sigma.
"""
from __future__ import annotations

from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from diffusion_jax.param.convert import Model
from diffusion_jax.param.roots import square_root
from diffusion_jax.samplers.exponential import SCAN_KEYS, carried_start, multistep_scan
from diffusion_jax.samplers.gddim import gddim_step
from diffusion_jax.samplers.plan import DIFFRAX_ADAPTIVE, DIFFRAX_FIXED
from diffusion_jax.sdes.base import Family

Array = Any
_SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint, "tsit5": diffrax.Tsit5,
            "dopri5": diffrax.Dopri5, "tsit5_adaptive": diffrax.Tsit5}


def _pf_drift(sde: Family, model: Model) -> Callable:
    def f(t, u, args):
        s = model.score(u, t)
        return sde.apply(sde.drift_matrix(t), u) - 0.5 * sde.apply(sde.noise_matrix(t), s)
    return f


def runner(sde: Family, apply: Callable, method: str, options: tuple, output: str, kind: str, t_start: float,
           t_end: float, denoise_final: bool, return_trajectory: bool) -> Callable:
    """The pure run function of one (family, network, method, static options) combination."""
    opts = dict(options)
    sqrt = square_root(sde, kind)

    def model_of(params):
        return Model(sde, lambda u, t: apply(params, u, t), output, sqrt)

    def finish(model, u):
        if denoise_final:                       # end on D(u, t_end) = E[x_0 | u]: one more evaluation
            u = u.at[..., 0].set(model.all(u, t_end)[2])
        return u

    def denoised_along(model, traj, ts):
        return jax.vmap(lambda u, t: model.all(u, t)[2])(traj, ts)

    if method in DIFFRAX_FIXED:
        def run(params, u0, key, tables):
            model = model_of(params)
            ts = jnp.asarray(tables["ts"], u0.dtype)
            saveat = diffrax.SaveAt(ts=ts) if return_trajectory else diffrax.SaveAt(t1=True)
            sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, u, p: _pf_drift(sde, model_of(p))(t, u, None)),
                                      _SOLVERS[method](), ts[0], ts[-1], None, u0, args=params,
                                      stepsize_controller=diffrax.StepTo(ts), saveat=saveat,
                                      max_steps=tables["ts"].shape[0])
            traj = sol.ys if return_trajectory else None
            den = denoised_along(model, traj, ts) if return_trajectory else None
            return finish(model, sol.ys[-1]), traj, den, ()
        return run

    if method in DIFFRAX_ADAPTIVE:
        def run(params, u0, key, tables):
            model = model_of(params)
            save = jnp.asarray(tables["ts"], u0.dtype)
            saveat = diffrax.SaveAt(ts=save) if return_trajectory else diffrax.SaveAt(t1=True)
            sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, u, p: _pf_drift(sde, model_of(p))(t, u, None)),
                                      _SOLVERS[method](), t_start, t_end, -(t_start - t_end) / 64, u0, args=params,
                                      stepsize_controller=diffrax.PIDController(rtol=opts["rtol"], atol=opts["atol"]),
                                      saveat=saveat, max_steps=opts["max_steps"], throw=False)
            traj = sol.ys if return_trajectory else None
            den = denoised_along(model, traj, save) if return_trajectory else None
            # diffrax's num_steps counts every attempted step (accepted + rejected)
            stats = (sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"],
                     sol.result == diffrax.RESULTS.successful)
            return finish(model, sol.ys[-1]), traj, den, stats
        return run

    if method == "euler_maruyama":
        t_hi, t_lo = float(t_start), float(t_end)

        def run(params, u0, key, tables):
            model = model_of(params)
            ts = jnp.asarray(tables["ts"], u0.dtype)
            shape, n = u0.shape, tables["ts"].shape[0]

            def drift(t, y, p):
                u = y.reshape(shape)
                s = model_of(p).score(u, t)
                return (sde.apply(sde.drift_matrix(t), u) - sde.apply(sde.noise_matrix(t), s)).reshape(-1)

            def diffusion(t, y, p):
                # G(t) dW as an operator on the flat Brownian increment (per pixel, or per mode through the basis)
                g = sde.diffusion_matrix(t)
                return lineax.FunctionLinearOperator(lambda w: sde.apply(g, w.reshape(shape)).reshape(-1),
                                                     jax.ShapeDtypeStruct((int(np.prod(shape)),), u0.dtype))

            # The grid is fixed and each step queries its own interval once, so independent N(0, dt) increments
            # per step are the exact Brownian law here (no tree: a VirtualBrownianTree to tolerance dt / 8 draws
            # ~2 log2(8 n) normals of the state's size per step). diffrax allows this path with forward-mode AD only.
            bm = diffrax.UnsafeBrownianPath(shape=jax.ShapeDtypeStruct((u0.size,), u0.dtype), key=key)
            terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
            saveat = diffrax.SaveAt(ts=ts) if return_trajectory else diffrax.SaveAt(t1=True)
            sol = diffrax.diffeqsolve(terms, diffrax.Euler(), ts[0], ts[-1], None, u0.reshape(-1), args=params,
                                      stepsize_controller=diffrax.StepTo(ts), saveat=saveat, max_steps=n,
                                      adjoint=diffrax.ForwardMode())
            ys = sol.ys.reshape((-1,) + shape)
            traj = ys if return_trajectory else None
            den = denoised_along(model, traj, ts) if return_trajectory else None
            return finish(model, ys[-1]), traj, den, ()
        return run

    if method == "gddim" and opts["predict"] == "denoiser":
        def run(params, u0, key, tables):
            model = model_of(params)
            tab = {k: jnp.asarray(tables[k], u0.dtype) for k in SCAN_KEYS}
            u_fin, traj, den = multistep_scan(sde, model, u0, tab)
            if not return_trajectory:
                return finish(model, u_fin), None, None, ()
            return finish(model, u_fin), jnp.concatenate([traj, u_fin[None]]), den, ()
        return run

    if method == "gddim":
        order, lam = int(opts["order"]), float(opts["lam"])
        stable = lam == 0
        carried_keys = ("w", "w_hat", "kz", "kt", "s_inv")

        def run(params, u0, key, tables):
            model = model_of(params)
            dtype = u0.dtype
            n = tables["psi"].shape[0]
            xs = tuple(jnp.asarray(tables[k], dtype) for k in ("psi", "coef", "zcoef", "noise", "m_next", "r_next"))
            car = {k: jnp.asarray(tables[k], dtype) for k in carried_keys}
            ts = jnp.asarray(tables["ts"], dtype)
            keys = jax.random.split(key, n)
            hist0 = jnp.zeros((order + 1,) + u0.shape, dtype)
            c0, z0 = carried_start(sde, u0, car["s_inv"][0])

            def step(carry, inp):
                u, c, z, hist = carry
                (t, psi, coef, zcoef, noise, m_next, r_next, row), k = inp
                if stable:
                    row = dict(row, coef=coef, zcoef=zcoef, m_next=m_next, r_next=r_next)
                    u_next, c, z, hist, d = gddim_step(sde, model, t, row, u, c, z, hist)
                else:
                    eps, _, d = model.all(u, t)
                    hist = jnp.concatenate([eps[None], hist[:-1]], axis=0)      # hist[j] = eps at t_{i-j}
                    u_next = sde.apply(psi, u) + sum(sde.apply(coef[j], hist[j]) for j in range(order + 1))
                    u_next = u_next + sde.apply(noise, jax.random.normal(k, u.shape, dtype))
                return (u_next, c, z, hist), (u, d)

            (u_fin, *_), (traj, den) = jax.lax.scan(step, (u0, c0, z0, hist0), ((ts[:-1],) + xs + (car,), keys))
            if not return_trajectory:
                return finish(model, u_fin), None, None, ()
            return finish(model, u_fin), jnp.concatenate([traj, u_fin[None]]), den, ()
        return run

    if method == "sscs":
        lam = float(opts["lam"])

        def run(params, u0, key, tables):
            model = model_of(params)
            dtype = u0.dtype
            names = ("mids", "half1", "half2", "nz1", "nz2", "kick")
            xs = tuple(jnp.asarray(tables[k], dtype) for k in names)
            n = tables["mids"].shape[0]
            keys = jax.random.split(key, (n, 2))

            def step(u, inp):
                (tm, h1, h2, g1, g2, kk), k2 = inp
                u = sde.apply(h1, u)
                if lam > 0:
                    u = u + sde.apply(g1, jax.random.normal(k2[0], u.shape, dtype))
                _, s, d = model.all(u, tm)
                u = sde.apply(h2, u + sde.apply(kk, s))
                if lam > 0:
                    u = u + sde.apply(g2, jax.random.normal(k2[1], u.shape, dtype))
                return u, (u, d)

            u_fin, (traj, den) = jax.lax.scan(step, u0, (xs, keys))
            if not return_trajectory:
                return finish(model, u_fin), None, None, ()
            # states after each step (at t_1..t_N) and denoiser outputs at the step midpoints
            return finish(model, u_fin), jnp.concatenate([u0[None], traj]), den, ()
        return run

    if method == "edm_heun":
        ode_jump = bool(opts["ode_jump"])

        def run(params, u0, key, tables):
            model = model_of(params)
            dtype = u0.dtype
            ts = jnp.asarray(tables["ts"], dtype)
            n = tables["dsig"].shape[0]
            f = _pf_drift(sde, model)

            def step(u, inp):
                i, t, t_next, ds, j0, j1 = inp
                eps, s, d = model.all(u, t)
                d0 = (sde.apply(sde.drift_matrix(t), u) - 0.5 * sde.apply(sde.noise_matrix(t), s)) * j0
                u_eul = u + ds * d0
                u_next = jax.lax.cond(i == n - 1, lambda: u_eul,
                                      lambda: u + ds * 0.5 * (d0 + f(t_next, u_eul, None) * j1))
                if ode_jump:
                    u_next = jnp.where(i == n - 1, u.at[..., 0].set(d), u_next)
                return u_next, (u, d)

            inp = (jnp.arange(n), ts[:-1], ts[1:], jnp.asarray(tables["dsig"], dtype),
                   jnp.asarray(tables["j0"], dtype), jnp.asarray(tables["j1"], dtype))
            u_fin, (traj, den) = jax.lax.scan(step, u0, inp)
            if not return_trajectory:
                return finish(model, u_fin), None, None, ()
            return finish(model, u_fin), jnp.concatenate([traj, u_fin[None]]), den, ()
        return run

    raise ValueError(f"no runner for method {method!r}")
