"""Force-field kernels side by side with VE: the same network, loop, preconditioning and sampler.

    python -m diffusion_jax bench-fields [--out bench_out/fields] [--kernels ve,pfgm,pfgmpp,radial_tanh,radial_exp]
        [--toy-steps 2000] [--digits-steps 1500] [--nfe 10,20,35] [--skip-digits]

Each kernel is a family (``pfgm``, ``pfgmpp`` with ``--toy-d`` / ``--digits-d``, ``radial_tanh``, ``radial_exp``;
``ve`` with the same noise range sigma in [0.002, 80] and the same t_min) trained by ``training.train`` with
``configs.field_model`` settings (EDM preconditioning, eps loss), then sampled by ``samplers.sample``
(``edm_heun`` from the family's prior with ceil(budget/2) Heun steps, the last one Euler, plus the final
denoising step: the reported exact NFE is 2 ceil(budget/2), i.e. 10, 20, 36 for 10, 20, 35). Metrics:

* toy 2-D (``--toy``, default checkerboard): sliced 2-Wasserstein (256 projections) of 2000 samples to 2000 test
  points; the **floor** is the distance between two independent data samples of that size and the
  **Gaussian fit** the distance from samples of N(mean, cov) of the data;
* digits (8x8): ``fd-pixels``, the Frechet distance between Gaussian fits of the flattened pixels in [0, 1]
  (not FID), of ``--digits-samples`` samples to the training split; the **floor** is the test split (297 images)
  against the same reference. Frechet distances grow as the sample shrinks, so the default sample count is
  297 as well: with more samples a model can score below this floor.

Runs resume from ``<out>/runs/<set>_<kernel>``. Writes ``fields.md`` and ``fields.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import jax

KERNELS = ("ve", "pfgm", "pfgmpp", "radial_tanh", "radial_exp")
NFES = (10, 20, 35)


def _family_params(kernel: str, D: float) -> dict:
    from diffusion_jax.fields.family import FieldFamily
    from diffusion_jax.fields.kernels import Gaussian
    if kernel == "ve":          # VE on the field families' noise range and time interval
        t_min = FieldFamily(Gaussian(), "ve", 0.002, 80.0).t_min
        return dict(sigma_min=0.002, sigma_max=80.0, t_min=t_min)
    return dict(D=D) if kernel == "pfgmpp" else {}


def _config(dataset: str, kernel: str, steps: int, D: float, toy: str):
    from diffusion_jax.training import configs
    build = configs.toy2d if dataset == "toy2d" else configs.digits
    c = configs.field_model(build(kernel, **_family_params(kernel, D)))
    if dataset == "toy2d":
        c.data.toy_name = toy
    c.training.num_steps = steps
    c.training.ckpt_every = steps
    c.training.sample_every = 0
    return c


def run(out: str = "bench_out/fields", kernels=KERNELS, toy_steps: int = 2000, digits_steps: int = 1500,
        nfes=NFES, toy: str = "checkerboard", toy_d: float = 4.0, digits_d: float = 128.0,
        digits: bool = True, toy_set: bool = True, digits_samples: int = 297) -> list[dict]:
    from diffusion_jax.evaluation.distances import sliced_wasserstein
    from diffusion_jax.evaluation.distances import gaussian_fit_samples
    from diffusion_jax.data import load_split, to_image_space
    from diffusion_jax.evaluation.features import PIXELS, frechet_distance_in
    from diffusion_jax.training import sample_data, train
    from diffusion_jax.training.state import pick_ema

    os.makedirs(out, exist_ok=True)
    rows = []
    sets = ([("toy2d", toy_steps, toy_d)] if toy_set else []) + ([("digits", digits_steps, digits_d)] if digits else [])
    for dataset, steps, D in sets:
        for kernel in kernels:
            c = _config(dataset, kernel, steps, D, toy)
            t0 = time.perf_counter()
            res = train(c, os.path.join(out, "runs", f"{dataset}_{kernel}"))
            secs = time.perf_counter() - t0
            exp, state = res["experiment"], res["state"]
            _, ema = pick_ema(state)
            if dataset == "toy2d":
                data = load_split(c, "test", limit=4000)
                ref, other = data[:2000], data[2000:]
                floor = sliced_wasserstein(other, ref)
                base = sliced_wasserstein(gaussian_fit_samples(other, 2000), ref)
                n, metric = 2000, "sliced-W2"
            else:
                ref = to_image_space(load_split(c, "train"))
                floor = frechet_distance_in(PIXELS, to_image_space(load_split(c, "test")), ref)["fd-pixels"]
                base = float("nan")
                n, metric = digits_samples, "fd-pixels"
            for nfe in nfes:
                x = sample_data(exp, ema, jax.random.PRNGKey(1), n, "edm_heun", nfe)
                if dataset == "toy2d":
                    value = sliced_wasserstein(x, ref)
                else:
                    value = frechet_distance_in(PIXELS, to_image_space(x), ref)["fd-pixels"]
                exact_nfe = 2 * ((nfe + 1) // 2) - 1 + 1
                row = dict(dataset=dataset, kernel=kernel, params=str(dict(c.family.params)), steps=steps,
                           nfe=exact_nfe, metric=metric, value=value, gaussian_fit=base, floor=floor,
                           train_seconds=secs)
                rows.append(row)
                print(f"{dataset:6s} {kernel:11s} NFE {exact_nfe:3d}  {metric} {value:.4f}  (floor {floor:.4f}, "
                      f"Gaussian fit {base:.3f})  train {secs:.0f} s", flush=True)
            _write(out, rows, nfes)
    return rows


def _write(out: str, rows: list[dict], nfes) -> None:
    with open(os.path.join(out, "fields.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "fields.md"), "w") as f:
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            sub = [r for r in rows if r["dataset"] == dataset]
            got = sorted(dict.fromkeys(r["nfe"] for r in sub))
            f.write(f"## {dataset}: {sub[0]['metric']} (edm_heun, NFE incl. the final denoising step), "
                    f"{sub[0]['steps']} training steps\n\n| kernel | params | " + " | ".join(f"NFE {k}" for k in got)
                    + " | floor | Gaussian fit |\n|" + "---|" * (len(got) + 4) + "\n")
            for kernel in dict.fromkeys(r["kernel"] for r in sub):
                rs = {r["nfe"]: r for r in sub if r["kernel"] == kernel}
                any_r = next(iter(rs.values()))
                f.write(f"| {kernel} | {any_r['params']} | " + " | ".join(
                    f"{rs[k]['value']:.4f}" if k in rs else "" for k in got)
                    + f" | {any_r['floor']:.4f} | {any_r['gaussian_fit']:.3f} |\n")
            f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-fields")
    p.add_argument("--out", default="bench_out/fields")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--toy-steps", type=int, default=2000)
    p.add_argument("--digits-steps", type=int, default=1500)
    p.add_argument("--nfe", default=",".join(str(n) for n in NFES))
    p.add_argument("--toy", default="checkerboard")
    p.add_argument("--toy-d", type=float, default=4.0, help="PFGM++ D on toy 2-D")
    p.add_argument("--digits-d", type=float, default=128.0, help="PFGM++ D on digits")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--digits-samples", type=int, default=297,
                   help="samples per digits cell (fd-pixels; 297 = the test split that gives the floor)")
    a = p.parse_args(argv)
    kernels = tuple(a.kernels.split(","))
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {','.join(KERNELS)}")
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    run(a.out, kernels, a.toy_steps, a.digits_steps, tuple(int(n) for n in a.nfe.split(",")), a.toy, a.toy_d,
        a.digits_d, not a.skip_digits, not a.skip_toy, a.digits_samples)
    return 0

