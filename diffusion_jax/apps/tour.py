"""A tour of the families: matrices, spectra, critical damping, and marginals over t (table + PNG)."""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import sdes

TOUR_FAMILIES = [("vp", {}), ("ve", {}), ("cld", {}), ("psld", {}), ("told", {}), ("cdhold", {"n": 4}),
                 ("cdhold", {"n": 6})]


def _label(name: str, params: dict) -> str:
    return name + (f"(n={params['n']})" if "n" in params else "")


def run_tour(out_dir: str) -> dict:
    """Print each family's definition and marginal statistics; write ``families.png``; return the table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ts = np.geomspace(1e-5, 1.0, 120).astype(np.float32)
    rows = {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    for name, params in TOUR_FAMILIES:
        start = time.perf_counter()
        sde = sdes.make(name, **params)
        label = _label(name, params)
        eig = np.sort_complex(np.linalg.eigvals(sde.A))
        cov, mean = jax.jit(lambda t: (sde.covariance(t), sde.mean_coefficient(t)))(jnp.asarray(ts))
        cov, mean = np.asarray(cov, np.float64), np.asarray(mean, np.float64)
        elapsed = time.perf_counter() - start
        print(f"== {label}: k = {sde.order}, beta = {type(sde.schedule).__name__}"
              f"{tuple(vars(sde.schedule).values())}, params = {sde.params}")
        print(f"A =\n{sde.A}\nQ diagonal = {np.diag(sde.Q)}\nSigma_0 diagonal = {np.diag(sde.sigma0)}")
        print(f"eigenvalues of A (LAPACK; a defective critically damped A spreads them by ~eps^(1/k)): {eig}")
        print(f"prior covariance =\n{sde.prior_covariance}")
        print(f"  {'t':>8} {'m_t (x)':>12} {'Var x_t':>12} {'corr(x, a1)':>12}")
        for t in [1e-5, 1e-3, 0.1, 0.5, 1.0]:
            i = int(np.argmin(np.abs(ts - t)))
            corr = cov[i, 0, 1] / np.sqrt(cov[i, 0, 0] * cov[i, 1, 1]) if sde.order > 1 else float("nan")
            print(f"  {ts[i]:8.1e} {mean[i, 0]:12.5g} {cov[i, 0, 0]:12.5g} {corr:12.6f}")
        print(f"  (tables + {len(ts)} marginals in {elapsed:.2f} s)\n")
        rows[label] = dict(order=sde.order, var_x_T=float(cov[-1, 0, 0]), var_x_tmin=float(cov[0, 0, 0]))
        axes[0, 0].loglog(ts, cov[:, 0, 0], label=label)
        axes[0, 1].semilogx(ts, mean[:, 0], label=label)
        if sde.order > 1:
            corr = cov[:, 0, 1] / np.sqrt(cov[:, 0, 0] * cov[:, 1, 1])
            axes[1, 0].semilogx(ts, corr, label=label)
        axes[1, 1].scatter(eig.real, eig.imag, label=label, s=18)
    axes[0, 0].set(title="Var(x_t | x_0) (float32 core)", xlabel="t")
    axes[0, 1].set(title="mean coefficient m_t = Phi(t,0)[x, x]", xlabel="t")
    axes[1, 0].set(title="corr(x_t, a1_t | x_0)", xlabel="t")
    axes[1, 1].set(title="eigenvalues of A (B-time units)", xlabel="Re", ylabel="Im")
    for ax in axes.ravel():
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "families.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax tour [--out demo_out]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax tour", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder for the PNG")
    run_tour(p.parse_args(argv).out)
    return 0
