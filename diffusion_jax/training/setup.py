"""From a config to the pieces of a run: the family, the preconditioned network, the optimiser, the mesh."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.training import configs
from diffusion_jax.models import get_model
from diffusion_jax.param import SquareRoot, square_root
from diffusion_jax.param.precond import Preconditioner, network_channels
from diffusion_jax.sdes import families
from diffusion_jax.sdes.base import Family
from diffusion_jax.training.state import make_optimizer

Array = Any


@dataclasses.dataclass(frozen=True, eq=False)      # hashed by identity: a static key of compiled samplers
class Experiment:
    config: Any
    sde: Family
    sqrt: SquareRoot
    precond: Preconditioner
    net: Any                       # a flax.linen Module
    data_shape: tuple[int, ...]
    tx: optax.GradientTransformation

    def eps_fn(self, params: Any, train: bool = False, dropout_key: Array | None = None
               ) -> Callable[[Array, Array], Array]:
        """eps(u, t_batch) of the preconditioned network with ``params``."""
        rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None

        def net(x, c_noise, train=train):
            return self.net.apply({"params": params}, x, c_noise, train=train, rngs=rngs)
        return lambda u, t: self.precond.eps(net, u, t)

    def apply(self, params: Any, u: Array, t: Array) -> Array:
        """eps(u, t_batch) of the preconditioned network with ``params`` (inference mode).

        The calling convention of the samplers and the likelihood: params are an argument, never captured,
        so one compiled program serves every checkpoint and EMA copy.
        """
        def net(x, c_noise, train=False):
            return self.net.apply({"params": params}, x, c_noise, train=False)
        return self.precond.eps(net, u, t)

    def init_params(self, seed: int) -> Any:
        """Network parameters from ``seed`` (traceable: :func:`state_initializer` runs it under jit)."""
        shape = (1,) + self.data_shape + (self.sde.order,)
        x = jnp.zeros(self.precond.to_network(jnp.zeros(shape)).shape)
        key = jax.random.key(seed, impl="rbg")      # rbg: fast to compile on CPU
        return self.net.init(key, x, jnp.ones((1,)), train=False)["params"]


def build_experiment(config, data_shape: tuple[int, ...]) -> Experiment:
    configs.validate(config)
    sde = families.make(config.family.name, **dict(config.family.params))
    if sde.data_shape is not None and tuple(sde.data_shape) != tuple(data_shape):
        raise ValueError(f"{sde.name} was built for data of shape {tuple(sde.data_shape)} but the data set "
                         f"gives {tuple(data_shape)}: set --config.family.params.shape='{tuple(data_shape)}'")
    sqrt = square_root(sde, config.model.K)
    if config.model.get("peer", ""):          # an imported checkpoint: the peer's own input/output conventions
        from diffusion_jax.interop import make_peer_preconditioner
        precond = make_peer_preconditioner(config.model.peer, sde, sqrt, config.model)
    else:
        precond = Preconditioner(sde, sqrt, sigma_data=config.data.sigma_data, mixed=config.model.mixed_score,
                                 c_out=config.model.get("c_out", False),
                                 time_input=config.model.get("time_input", "1000t"))
    width = network_channels(sde, data_shape)
    in_width, out_width = width, width
    if hasattr(precond, "network_channels"):  # a peer network whose output is not k C (CLD-SGM: velocity only)
        in_width, out_width = precond.network_channels(tuple(data_shape), sde.order)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    kwargs = dict(config.model.kwargs)
    if config.model.name == "mlp":
        net = get_model("mlp", out_dim=out_width, dtype=dtype, **kwargs)
    else:
        net = get_model(config.model.name, in_channels=in_width, out_channels=out_width, dtype=dtype, **kwargs)
    tx = make_optimizer(config.optim, config.training.num_steps)
    return Experiment(config, sde, sqrt, precond, net, tuple(data_shape), tx)


def make_mesh(config) -> Mesh:
    """A 1-D 'data' mesh (``jax.make_mesh``, axis type Auto) over ``config.mesh.data`` devices (-1: all,
    across every process); raises :class:`~diffusion_jax.training.configs.ConfigError` if the global batch does
    not split evenly over them (before anything is compiled or written)."""
    from jax.sharding import AxisType
    total = jax.device_count()
    n = total if config.mesh.data == -1 else int(config.mesh.data)
    if n < 1 or n > total:
        raise configs.ConfigError(f"config.mesh.data={config.mesh.data} but {total} devices exist: use -1 "
                                  f"(all) or a count in 1..{total}")
    if n != total and jax.process_count() > 1:
        raise configs.ConfigError(f"config.mesh.data={n} uses part of the {total} devices of a "
                                  f"{jax.process_count()}-process job: use -1 (every device)")
    if config.training.batch_size % n:
        raise configs.ConfigError(
            f"config.training.batch_size={config.training.batch_size} is not divisible by the {n} devices of "
            f"the 'data' mesh axis ({jax.process_count()} process(es)): use a multiple of {n}")
    devices = None if n == total else jax.devices()[:n]
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-sharded along 'data')."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def state_initializer(exp: Experiment, sharding: NamedSharding) -> Callable[[], Any]:
    """A jitted function () -> fresh train state, created directly with ``sharding`` (no host copy).

    ``jax.eval_shape`` of it is the restore target of a resumed run (no throw-away initialisation).
    """
    from diffusion_jax.training.state import create_state
    config = exp.config

    def init():
        return create_state(exp.init_params(config.seed), exp.tx, config.ema_rates, config.seed)
    return jax.jit(init, out_shardings=sharding)


def abstract_state(exp: Experiment, sharding: NamedSharding) -> Any:
    """ShapeDtypeStructs (with ``sharding``) of the train state, from ``jax.eval_shape`` (no FLOPs)."""
    shapes = jax.eval_shape(state_initializer(exp, sharding))
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)
