"""Exact-score solver benchmark: sampler error versus NFE for every family, no network involved.

Data: a 2-D mixture of 8 Gaussians on the unit circle (variance 0.01, equal weights); its score is exact
for every linear family (diffusion_jax.exact). From 256 prior samples (fixed seed) each sampler runs from
T to t_end = 1e-3; the error is the mean L2 distance of the data coordinate to a high-accuracy reference
solve (diffrax Dopri5, rtol = atol = 1e-7) from the same initial state. Stochastic samplers are scored by
the sliced Wasserstein distance of their data coordinate to true mixture samples (same for all).
"""
from __future__ import annotations

import csv
import os
import time

import jax
import numpy as np

from diffusion_jax import exact, sdes
from diffusion_jax.evaluation.distances import sliced_wasserstein
from diffusion_jax.exact import exact_eps_fn
from diffusion_jax.samplers import prior_init, sample

FAMILIES = {"vp": ("vp", {}), "cld": ("cld", {}), "told": ("told", {}), "cdhold4": ("cdhold", {"n": 4}),
            "psld": ("psld", {})}
NFES = (5, 10, 20, 50, 100, 200, 500, 1000)
# name -> (method, options); deterministic unless noted
SAMPLERS = {
    "euler": ("euler", {}), "heun": ("heun", {}), "midpoint": ("midpoint", {}),
    "edm_heun": ("edm_heun", {}),
    "gddim_q0": ("gddim", dict(order=0)), "gddim_q1": ("gddim", dict(order=1)),
    "gddim_q2": ("gddim", dict(order=2)), "gddim_q3": ("gddim", dict(order=3)),
    "gddim_q1_logsnr": ("gddim", dict(order=1, grid="logsnr")),
    "gddim_q2_logsnr": ("gddim", dict(order=2, grid="logsnr")),
    "gddim_q2_quad": ("gddim", dict(order=2, grid="quadratic")),
    "sscs_ode": ("sscs", dict(lam=0.0)),
    "euler_maruyama": ("euler_maruyama", {}), "sscs": ("sscs", dict(lam=1.0)),
    "gddim_stoch": ("gddim", dict(order=0, lam=1.0)),
}
STOCHASTIC = {"euler_maruyama", "sscs", "gddim_stoch"}




def run(out_dir: str, families=None, samplers=None, nfes=NFES, n_samples: int = 256, t_end: float = 1e-3,
        seed: int = 0) -> list[dict]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    families = families or list(FAMILIES)
    samplers = samplers or list(SAMPLERS)
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"unknown family {name!r}; choose from {list(FAMILIES)}")
    for name in samplers:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose from {list(SAMPLERS)}")
    mix = exact.ring_of_gaussians(8, 1.0, 0.01)
    true = np.asarray(mix.sample(jax.random.PRNGKey(seed + 1), n_samples))
    rows = []
    for fam in families:
        sde = sdes.make(FAMILIES[fam][0], **FAMILIES[fam][1])
        fn = exact_eps_fn(sde, mix)
        u0 = prior_init(sde, jax.random.PRNGKey(seed), n_samples, (2,))
        start = time.perf_counter()
        ref, info = sample(sde, fn, u0, method="dopri5", rtol=1e-7, atol=1e-7, t_end=t_end, max_steps=100_000)
        ref = np.asarray(ref[..., 0], np.float64)
        print(f"[{fam}] reference: dopri5 nfe={info.nfe} in {time.perf_counter() - start:.1f} s; "
              f"SW(reference, data) = {sliced_wasserstein(ref, true):.4f}", flush=True)
        fig, ax = plt.subplots(figsize=(7, 5))
        for sname in samplers:
            method, opts = SAMPLERS[sname]
            opts = dict(opts)
            errs = []
            for nfe in nfes:
                if method == "gddim" and opts.get("order", 0) > nfe - 1:
                    continue
                start = time.perf_counter()
                try:
                    u, info = sample(sde, fn, u0, method=method, nfe=nfe, t_end=t_end,
                                     key=jax.random.PRNGKey(seed + 2), **opts)
                except ValueError as e:                      # e.g. heun needs nfe >= 2
                    print(f"  skip {sname} nfe={nfe}: {e}")
                    continue
                x = np.asarray(u[..., 0], np.float64)
                ok = bool(np.all(np.isfinite(x)))
                err = float(np.mean(np.linalg.norm(x - ref, axis=1))) if ok else float("nan")
                sw = sliced_wasserstein(x, true) if ok else float("nan")
                row = dict(family=fam, sampler=sname, nfe_requested=nfe, nfe=info.nfe,
                           mean_l2_to_reference=err, sliced_w2_to_data=sw,
                           seconds=time.perf_counter() - start)
                rows.append(row)
                errs.append((info.nfe, sw if sname in STOCHASTIC else err))
                print(f"  {sname:16s} nfe={info.nfe:5d}  L2 to ref {err:.3e}  SW to data {sw:.4f}", flush=True)
            if errs:
                xs, ys = zip(*errs)
                ax.loglog(xs, ys, "o-" if sname not in STOCHASTIC else "x--", label=sname, ms=3)
        ax.set(title=f"{fam}: exact-score sampling error (stochastic: sliced W2 to data)", xlabel="NFE",
               ylabel="mean L2 to reference")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"error_vs_nfe_{fam}.png"), dpi=110)
        plt.close(fig)
    _write_tables(rows, out_dir)
    return rows


def _write_tables(rows: list[dict], out_dir: str) -> None:
    if not rows:
        return
    with open(os.path.join(out_dir, "bench_solvers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fams = sorted({r["family"] for r in rows}, key=list(FAMILIES).index)
    lines = ["# Exact-score solver benchmark", "",
             "Mean L2 error of the data coordinate against a Dopri5 (rtol=atol=1e-7) reference from the same "
             "256 prior samples, T -> t = 1e-3, 8-Gaussian ring. Stochastic samplers: sliced W2 to data.", ""]
    for fam in fams:
        sub = [r for r in rows if r["family"] == fam]
        nfes = sorted({r["nfe_requested"] for r in sub})
        lines += [f"## {fam}", "", "| sampler | " + " | ".join(str(n) for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for s in dict.fromkeys(r["sampler"] for r in sub):
            cells = []
            for n in nfes:
                r = next((r for r in sub if r["sampler"] == s and r["nfe_requested"] == n), None)
                key = "sliced_w2_to_data" if s in STOCHASTIC else "mean_l2_to_reference"
                cells.append("" if r is None else f"{r[key]:.2e} ({r['nfe']})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(os.path.join(out_dir, "bench_solvers.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out_dir}/bench_solvers.md, .csv and error_vs_nfe_*.png")


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-solvers [--families ...] [--samplers ...] [--nfe ...]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-solvers", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/solvers")
    p.add_argument("--families", default=None, help=f"comma list of {','.join(FAMILIES)}")
    p.add_argument("--samplers", default=None, help=f"comma list of {','.join(SAMPLERS)}")
    p.add_argument("--nfe", default=None, help="comma list of NFE (default 5,10,20,50,100,200,500,1000)")
    p.add_argument("--n-samples", type=int, default=256)
    a = p.parse_args(argv)
    split = lambda v: v.split(",") if v else None
    nfes = tuple(int(n) for n in a.nfe.split(",")) if a.nfe else NFES
    run(a.out, split(a.families), split(a.samplers), nfes, a.n_samples)
    return 0
