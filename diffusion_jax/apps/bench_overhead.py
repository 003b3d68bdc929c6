"""Sampler overhead at CIFAR-10 shape: compile time apart, and the non-network share of a gDDIM sample.

``python -m diffusion_jax bench-overhead [--family cld] [--batch 256] [--nfe 50] [--net-batch 8]``

1. The sampler with a zero network (same calling convention ``apply(params, u, t)``): its compile time, then its
   steady-state time at ``batch`` (best of repeats, checked to compile nothing more). That time is everything but
   the network: K_t evaluations, conversions, the linear updates.
2. The sampler with the ``cifar10_<family>`` config's preconditioned DDPM++ (the full config): compile time of the
   whole program, its lowered StableHLO size against the parameter bytes (weights are arguments, not constants),
   and its steady-state time at ``net_batch``; the network forward alone at ``net_batch``.
3. The non-network share of a ``nfe``-step sample: measured directly at ``net_batch``, and at ``batch`` from (1)
   and the forward time scaled linearly (CPU memory and time make batch 256 impractical for the network there).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers
from diffusion_jax.compilation import CompileLog
from diffusion_jax.samplers import prior_init


def _zero_network(params, u, t):
    return jnp.zeros_like(u)


def _steady(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def run(family: str = "cld", batch: int = 256, nfe: int = 50, net_batch: int = 8, order: int = 2) -> dict:
    from diffusion_jax.training import build_experiment, configs
    exp = build_experiment(configs.cifar10(family), (32, 32, 3))
    sde = exp.sde
    kw = dict(method="gddim", nfe=nfe, order=order, K=exp.sqrt)

    # 1. everything but the network
    u0 = prior_init(sde, jax.random.PRNGKey(0), batch, exp.data_shape)
    zero = samplers.compile(sde, _zero_network, **kw)
    with CompileLog() as log:
        jax.block_until_ready(zero(None, u0).u)
    compile_zero = log.seconds("sampler_")
    with CompileLog() as again:
        t_zero = _steady(lambda: zero(None, u0).u)
    if again.count("sampler_"):
        raise RuntimeError("the steady-state loop recompiled the sampler")

    # 2. the full sampler with DDPM++
    params = exp.init_params(0)
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree_util.tree_leaves(params))
    u_small = prior_init(sde, jax.random.PRNGKey(1), net_batch, exp.data_shape)
    draw = samplers.compile(sde, exp.apply, **kw)
    hlo_chars = len(draw.lower(params, u_small).as_text())
    with CompileLog() as log:
        jax.block_until_ready(draw(params, u_small).u)
    compile_full = log.seconds("sampler_")
    with CompileLog() as again:
        t_full = _steady(lambda: draw(params, u_small).u, repeat=1)
        fwd = jax.jit(exp.apply)
        tt = jnp.full((net_batch,), 0.5, u_small.dtype)
        jax.block_until_ready(fwd(params, u_small, tt))
        t_fwd = _steady(lambda: fwd(params, u_small, tt))
    if again.count("sampler_"):
        raise RuntimeError("the full sampler recompiled")

    share_small = max(t_full - nfe * t_fwd, 0.0) / t_full
    t_net_batch = nfe * t_fwd * batch / net_batch
    share_batch = t_zero / (t_zero + t_net_batch)
    out = dict(device=jax.devices()[0].device_kind, family=family, nfe=nfe, order=order, batch=batch,
               net_batch=net_batch, compile_s_zero_network=compile_zero, steady_s_zero_network=t_zero,
               compile_s_full=compile_full, hlo_chars_full=hlo_chars, param_bytes=param_bytes,
               steady_s_full_at_net_batch=t_full, forward_s_at_net_batch=t_fwd,
               non_network_share_at_net_batch=share_small, non_network_share_at_batch=share_batch)
    print(f"device {out['device']}; {family} at CIFAR-10 shape 32x32x3, gDDIM order {order}, {nfe} NFE")
    print("| what | value |\n|---|---|")
    print(f"| compile, sampler with a zero network | {compile_zero:.1f} s |")
    print(f"| steady state, zero network, batch {batch} | {t_zero:.3f} s |")
    print(f"| compile, sampler with DDPM++ (cifar10_{family}) | {compile_full:.1f} s |")
    print(f"| lowered StableHLO / parameter bytes | {hlo_chars / 1e6:.2f} M chars / {param_bytes / 1e6:.1f} MB |")
    print(f"| steady state, full sampler, batch {net_batch} | {t_full:.2f} s |")
    print(f"| DDPM++ forward, batch {net_batch} | {t_fwd:.3f} s |")
    print(f"| non-network share, measured at batch {net_batch} | {share_small:.2%} |")
    print(f"| non-network share at batch {batch} (forward scaled linearly) | {share_batch:.2%} |")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_jax bench-overhead [--family cld] [--batch 256] [--nfe 50] [--net-batch 8]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m diffusion_jax bench-overhead", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="cld")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--order", type=int, default=2, help="gDDIM multistep order")
    p.add_argument("--net-batch", type=int, default=8, help="batch of the runs with the network")
    a = p.parse_args(argv)
    run(a.family, a.batch, a.nfe, a.net_batch, a.order)
    return 0
