"""Run by tests/test_compile_once.py with 8 forced host devices: samplers on one device vs the batch sharded over
a 'data' mesh of 8, from the same noise and key. Prints one JSON line."""
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion_jax import samplers, sdes
from diffusion_jax.samplers import prior_init


def apply(params, u, t):
    # a small nonlinear eps model with parameters (per-coordinate scale and a t-dependent shift)
    return jnp.tanh(u * params["w"] + params["b"] * t[:, None, None])


def main() -> None:
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sde = sdes.make("cld")
    params = {"w": jnp.array([0.7, -0.3]), "b": jnp.array([0.2, 0.1])}
    u0 = prior_init(sde, jax.random.PRNGKey(0), 16, (3,))
    key = jax.random.key(7)
    res = {}
    for name, method, opts in [("gddim", "gddim", dict(order=2)), ("heun", "heun", {}), ("sscs", "sscs", {}),
                               ("gddim_stochastic", "gddim", dict(lam=1.0))]:
        draw = samplers.compile(sde, apply, method=method, nfe=8, **opts)
        one = jax.device_put(u0, devices[0])
        a = draw(params, one, key).u
        sharded = jax.device_put(u0, NamedSharding(mesh, P("data")))
        b = draw(params, sharded, key).u
        res[name] = dict(max_abs_diff=float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         scale=float(np.max(np.abs(np.asarray(a)))),
                         sharded=len(b.sharding.device_set) == len(devices))
    print(json.dumps(dict(devices=len(devices), methods=res)))


if __name__ == "__main__":
    main()
