"""Sampler overhead: a gDDIM sample with a trivial fn versus one with the DDPM++ network.

The trivial fn returns zeros, so its timing is everything but the network: the K_t evaluations, the
conversions and the linear updates. The network's forward pass is timed on its own at ``net_batch``
(CPU memory and time make batch 256 impractical there) and scaled linearly to ``batch``.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from diffusion_jax import sdes
from diffusion_jax.models import DDPMpp
from diffusion_jax.samplers import prior_init, sample


def _time(f, *args, repeat: int = 2) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return first, best


def run(family: str = "cld", batch: int = 256, nfe: int = 50, net_batch: int = 8, resolution: int = 32,
        channels: int = 3) -> dict:
    sde = sdes.make(family)
    k = sde.order
    shape = (resolution, resolution, channels)
    u0 = prior_init(sde, jax.random.PRNGKey(0), batch, shape)
    trivial = lambda u, t: jnp.zeros_like(u)
    sample(sde, trivial, u0, method="gddim", nfe=nfe, order=2)       # compile + host coefficients
    start = time.perf_counter()
    u, _ = sample(sde, trivial, u0, method="gddim", nfe=nfe, order=2)
    jax.block_until_ready(u)
    t_trivial = time.perf_counter() - start
    net = DDPMpp(in_channels=k * channels, out_channels=k * channels)
    x = jnp.zeros((net_batch, resolution, resolution, k * channels))
    params = jax.jit(lambda key: net.init(key, x, jnp.zeros((net_batch,)), train=False))(
        jax.random.key(0, impl="rbg"))
    fwd = jax.jit(lambda p, xx, tt: net.apply(p, xx, tt, train=False))
    compile_s, fwd_s = _time(fwd, params, x, jnp.full((net_batch,), 500.0))
    per_nfe = fwd_s * batch / net_batch
    out = dict(device=jax.devices()[0].device_kind, family=family, batch=batch, nfe=nfe,
               trivial_sample_s=t_trivial, net_forward_s_at_net_batch=fwd_s, net_batch=net_batch,
               net_forward_s_scaled_to_batch=per_nfe, network_sample_s_estimate=t_trivial + nfe * per_nfe)
    print(f"device: {out['device']}; {family}, batch {batch}, {resolution}x{resolution}x{channels}, k={k}")
    print(f"gDDIM (q=2) {nfe} NFE with a trivial fn: {t_trivial:.3f} s (non-network cost, after compile)")
    print(f"DDPM++ forward at batch {net_batch}: {fwd_s:.3f} s (compile {compile_s:.1f} s) -> "
          f"{per_nfe:.2f} s per NFE at batch {batch}")
    print(f"non-network share of a {nfe}-NFE sample: {t_trivial / (t_trivial + nfe * per_nfe):.2%}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-overhead [--family cld] [--batch 256] [--nfe 50]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-overhead", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="cld")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--net-batch", type=int, default=8, help="batch for timing the network forward")
    a = p.parse_args(argv)
    run(a.family, a.batch, a.nfe, a.net_batch)
    return 0
