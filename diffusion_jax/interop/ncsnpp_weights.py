r"""Weights of peer NCSN++ / DDPM++ networks -> the parameter tree of :class:`diffusion_jax.models.NCSNpp`.

**PyTorch ports** (score_sde_pytorch and the codes built on it: CLD-SGM, PSLD) keep every layer in one
``nn.ModuleList`` ``all_modules``, in the order the forward pass uses them, with sub-layer names equal to
score_sde's Flax names (``all_modules.7.Conv_1.weight``, ``all_modules.9.NIN_2.W`` ...). The library's
NCSNpp creates its top-level layers in that same order, so the i-th top-level layer of the Flax tree is
``all_modules.i``, except that the port does not list the conv-less pyramid resamplers (the Flax layers
marked ``pyramid=True, with_conv=False``), which are skipped. Per leaf:

    Conv kernel (kh, kw, I, O)  <- weight (O, I, kh, kw)      Dense kernel (I, O) <- weight (O, I)
    FIR Conv2d weight (HWIO)    <- weight (O, I, kh, kw)      GroupNorm scale     <- weight
    bias, NIN W (I, O), NIN b, Fourier W                      <- the same name, unchanged

Every expected tensor must be present with the right shape, and every tensor of the state dict must be
used (apart from named buffers such as ``sigmas``); otherwise the error lists the missing, extra and
wrong-shape keys.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not match the network built from the config (keys listed)."""


def _shapes(net: nn.Module, image_shape: tuple[int, int]) -> tuple[dict, list[str]]:
    """Parameter shapes of ``net`` and the names of its top-level layers in call order, as the PyTorch
    port lists them: every layer but the conv-less pyramid resamplers (parameter-less 'ddpm' Up/Downsample
    layers do take an index there)."""
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        mod = context.module
        parent = mod.parent
        if (context.method_name == "__call__" and isinstance(parent, nn.Module)
                and not isinstance(parent.parent, nn.Module) and mod.name not in order
                and not (getattr(mod, "pyramid", False) and not mod.with_conv)):
            order.append(mod.name)
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, *image_shape, net.in_channels), jnp.float32)
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, jnp.ones((1,)), train=False))
    params = shapes["params"]
    return params, order


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "weight": "weight", "bias": "bias", "W": "W", "b": "b"}


def _from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf in ("kernel", "weight") and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    if leaf in ("kernel", "weight") and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def report_mismatch(what: str, missing: Iterable[str], extra: Iterable[str],
                    wrong: Iterable[tuple[str, tuple, tuple]]) -> CheckpointMismatch:
    """A :class:`CheckpointMismatch` whose message lists every missing / extra / wrong-shape key."""
    missing, extra, wrong = sorted(missing), sorted(extra), sorted(wrong)
    lines = [f"{what}: the checkpoint does not match the network of this config (another architecture "
             f"or other model settings?). Check config.model.kwargs against the checkpoint's config."]
    if missing:
        lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if extra:
        lines.append(f"unexpected ({len(extra)}): " + ", ".join(extra))
    if wrong:
        lines.append(f"wrong shape ({len(wrong)}): " + ", ".join(f"{k} {tuple(s)} (expected {tuple(e)})"
                                                                for k, s, e in wrong))
    return CheckpointMismatch("\n".join(lines))


def ncsnpp_from_torch(state_dict: Mapping[str, Any], net: nn.Module, image_shape: tuple[int, int],
                      prefix: str = "all_modules.", ignore: Iterable[str] = ("sigmas",),
                      what: str = "NCSN++ state dict") -> dict:
    """Map a PyTorch NCSN++ state dict (``all_modules.<i>....``) onto ``net``'s parameter tree.

    Args:
      state_dict: torch key -> array (numpy or anything ``np.asarray`` accepts), e.g. from
        :func:`diffusion_jax.evaluation.torch_pickle.load_torch_checkpoint`.
      net: the :class:`~diffusion_jax.models.NCSNpp` with the checkpoint's options.
      image_shape: (H, W) the network runs at (attention placement depends on it).
      prefix: prefix of the network's keys in ``state_dict`` (e.g. ``"module.all_modules."``).
      ignore: keys (after the prefix's owner) that are buffers, not weights.

    Returns:
      ``params`` (nested dict of float32 numpy arrays) for ``net.apply({"params": params}, ...)``.

    Raises:
      CheckpointMismatch: listing every missing, unexpected and wrong-shape key.
    """
    shapes, order = _shapes(net, image_shape)
    owner = prefix[: -len("all_modules.")] if prefix.endswith("all_modules.") else prefix
    ignored = {owner + k for k in ignore}
    flat_shapes = _flatten(shapes)
    missing, wrong, used, out = [], [], set(), {}
    for path, sds in flat_shapes.items():
        leaf = path[-1]
        key = prefix + ".".join([str(order.index(path[0]))] + list(path[1:-1]) + [_TORCH_LEAF[leaf]])
        expected = _torch_shape(leaf, sds.shape)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state_dict[key], dtype=np.float32)
        if value.shape != expected:
            wrong.append((key, value.shape, expected))
            continue
        out[path] = _from_torch(leaf, value)
    extra = [k for k in state_dict if k.startswith(owner) and k not in used and k not in ignored]
    if missing or extra or wrong:
        raise report_mismatch(what, missing, extra, wrong)
    return _unflatten(out)


def ncsnpp_from_flax(params: Mapping, net: nn.Module, image_shape: tuple[int, int],
                     what: str = "NCSN++ Flax parameters") -> dict:
    """Check a score_sde-Flax-named NCSN++ parameter tree against ``net`` (names and shapes, one to one)
    and return it as float32 numpy arrays."""
    shapes, _ = _shapes(net, image_shape)
    expected, given = _flatten(shapes), _flatten(params)
    name = "/".join
    missing = [name(p) for p in expected if p not in given]
    extra = [name(p) for p in given if p not in expected]
    wrong = [(name(p), np.shape(given[p]), expected[p].shape) for p in expected
             if p in given and tuple(np.shape(given[p])) != tuple(expected[p].shape)]
    if missing or extra or wrong:
        raise report_mismatch(what, missing, extra, wrong)
    return _unflatten({p: np.asarray(v, dtype=np.float32) for p, v in given.items()})
