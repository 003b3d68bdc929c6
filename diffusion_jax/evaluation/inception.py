"""The FID Inception-v3 network of pytorch-fid, ported to Flax linen, with its weight mapping.

What this network is
--------------------
FID (Heusel et al. 2017) is defined with one particular network: the TensorFlow Inception-v3 graph
``inception-2015-12-05`` whose 2048-d ``pool_3`` activations are the features. pytorch-fid
(github.com/mseitzer/pytorch-fid) ports that graph to PyTorch as torchvision's ``Inception3`` with four
blocks patched to match TensorFlow, and publishes the ported weights as
``pt_inception-2015-12-05-6726825d.pth``. This module is a Flax port of exactly that network:

* ``BasicConv2d`` = conv (no bias) -> BatchNorm (eps = 1e-3, inference mode, running statistics)
  -> ReLU:  ``y = relu(gamma * (W * x - running_mean) / sqrt(running_var + 1e-3) + beta)``.
* Stem: Conv2d_1a_3x3 (stride 2), Conv2d_2a_3x3, Conv2d_2b_3x3 (pad 1), max-pool 3/2,
  Conv2d_3b_1x1, Conv2d_4a_3x3, max-pool 3/2 (all pools unpadded, floor mode).
* Mixed_5b/5c/5d = ``FIDInceptionA`` (pool features 32, 64, 64), Mixed_6a = torchvision InceptionB,
  Mixed_6b..6e = ``FIDInceptionC`` (7x7 channels 128, 160, 160, 192), Mixed_7a = torchvision InceptionD,
  Mixed_7b = ``FIDInceptionE_1``, Mixed_7c = ``FIDInceptionE_2``.
* The FID patches: the 3x3/stride-1/pad-1 average pool inside A, C and E_1 does not count the padded
  zeros (``count_include_pad=False``, TensorFlow's behaviour); E_2 uses a 3x3/stride-1/pad-1 *max*
  pool instead (a quirk of the TF graph that pytorch-fid reproduces).
* Features: global average pool of Mixed_7c -> 2048-d ("pool3"). The 1008-way ``fc`` layer of the
  checkpoint is kept so the parameter tree maps one-to-one onto the checkpoint; it is only evaluated
  with ``logits=True``.

Input convention and resize (stated precisely)
----------------------------------------------
Images are NHWC floats in [0, 1] (uint8 is divided by 255); 1-channel images are repeated to 3.
As in pytorch-fid, the image is first resized to 299 x 299 and then mapped to [-1, 1] by ``2 x - 1``.
pytorch-fid resizes with ``F.interpolate(mode="bilinear", align_corners=False)`` and no antialiasing;
clean-fid instead resizes with PIL bicubic (antialiased) on uint8 images, which gives different numbers.
**We implement the pytorch-fid resize**: ``jax.image.resize(x, (n, 299, 299, c), "bilinear",
antialias=False)``. Both sample at half-pixel centres, ``src = (dst + 1/2) * in/out - 1/2``, with the
2-tap triangle kernel; torch clamps ``src`` to ``[0, in - 1]`` while jax renormalises the kernel weights
that fall inside the image, which is the same thing at the borders. For upsampling the ``antialias``
flag is irrelevant (the kernel is only widened when downsampling); for downsampling ``antialias=False``
is what keeps the 2-tap torch behaviour. ``tests/test_metrics.py`` checks this against an independent
numpy implementation of torch's formula, for up- and downsampling.

Weights
-------
Nothing is downloaded at run time. ``load_inception_weights`` reads the original ``.pth`` (without
torch, through :mod:`diffusion_jax.evaluation.torch_pickle`, after checking the sha256 prefix
``6726825d``) or a ``.npz`` written by :func:`convert_weights`. The mapping between the two layouts is
one-to-one: conv ``weight`` OIHW <-> ``kernel`` HWIO, ``fc.weight`` (out, in) <-> ``kernel`` (in, out),
``bn.weight/bias`` <-> ``scale/bias``, ``bn.running_mean/var`` <-> ``batch_stats`` ``mean/var``;
BatchNorm's ``num_batches_tracked`` counters carry no information for inference and are ignored.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.evaluation import torch_pickle

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_ENV = "DIFFUSION_JAX_FID_WEIGHTS"
INCEPTION_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + unused)

Variables = Dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU, NHWC.

    ``padding`` is symmetric ``(pad_h, pad_w)`` as in ``torch.nn.Conv2d``.
    """
    features: int
    kernel_size: Tuple[int, int]
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    """InceptionA (35x35 grid) with the exclude-padding average pool. Output 224 + pool_features."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (torchvision InceptionB, unchanged by pytorch-fid). Output 480 + C_in."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """InceptionC (17x17 grid, factorised 7x7) with the exclude-padding average pool. Output 768."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (torchvision InceptionD, unchanged by pytorch-fid). Output 512 + C_in."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class _FIDInceptionE(nn.Module):
    """InceptionE (8x8 grid, expanded filter bank). Output 2048; ``pool`` is the FID patch."""
    pool: str = "avg"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_exclude_pad(x)
        elif self.pool == "max":
            # Padding with -inf: a padded position never wins the max (as torch's max_pool2d).
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801  (name as in pytorch-fid)
    """Mixed_7b: InceptionE with the exclude-padding 3x3 average pool."""
    pool: str = "avg"


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    """Mixed_7c: InceptionE with a 3x3/stride-1/pad-1 max pool (the TF graph's quirk)."""
    pool: str = "max"


def resize_bilinear_torch(images: jax.Array, size: int = INCEPTION_INPUT_SIZE) -> jax.Array:
    """NHWC bilinear resize identical to ``F.interpolate(bilinear, align_corners=False)`` (no antialias).

    ``out[i] = (1 - l) x[i0] + l x[min(i0 + 1, in - 1)]`` with ``s = max((i + 1/2) in/out - 1/2, 0)``,
    ``i0 = floor(s)``, ``l = s - i0``, separably in H and W (see the module docstring).
    """
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, size, size, c), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``InceptionV3`` (FID weights, block 3) as a Flax module.

    ``__call__(images)`` takes NHWC images in [0, 1] with 1 or 3 channels and returns the 2048-d
    pool3 features (float32). With ``logits=True`` it returns ``(features, logits)``, the 1008-way
    ``fc`` output; ``init`` must be called with ``logits=True`` to create the full parameter tree.

    Attributes:
      resize_input: resize to 299 x 299 first (pytorch-fid's default ``resize_input=True``).
      normalize_input: map [0, 1] to [-1, 1] by ``2 x - 1`` (pytorch-fid's ``normalize_input=True``).
      dtype: compute dtype; parameters stay float32 and features are returned as float32.
    """
    resize_input: bool = True
    normalize_input: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, logits: bool = False):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
        x = images.astype(jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if self.resize_input and x.shape[1:3] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            x = resize_bilinear_torch(x, INCEPTION_INPUT_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(self.dtype)
        conv = functools.partial(BasicConv2d, dtype=self.dtype)
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)   # 149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                   # 147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)   # 147
        x = _max_pool_3x3_s2(x)                                         # 73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                  # 71
        x = _max_pool_3x3_s2(x)                                         # 35
        x = FIDInceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)     # 256
        x = FIDInceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)     # 288
        x = FIDInceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)     # 288
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)            # 768 @ 17
        x = FIDInceptionC(128, dtype=self.dtype, name="Mixed_6b")(x)
        x = FIDInceptionC(160, dtype=self.dtype, name="Mixed_6c")(x)
        x = FIDInceptionC(160, dtype=self.dtype, name="Mixed_6d")(x)
        x = FIDInceptionC(192, dtype=self.dtype, name="Mixed_6e")(x)
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)            # 1280 @ 8
        x = FIDInceptionE_1(dtype=self.dtype, name="Mixed_7b")(x)       # 2048
        x = FIDInceptionE_2(dtype=self.dtype, name="Mixed_7c")(x)       # 2048
        # Adaptive average pool to 1x1 = mean over the spatial grid, accumulated in float32.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not logits:
            return features
        out = nn.Dense(NUM_CLASSES, dtype=jnp.float32, name="fc")(features)
        return features, out


# ----------------------------------------------------------------------------------------------
# Parameter-tree mapping  (Flax variables  <->  pytorch-fid state dict)
# ----------------------------------------------------------------------------------------------

# (collection, Flax leaf name) -> torch leaf name.  The parent module ("conv"/"bn"/"fc") is kept.
_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_name(collection: str, path: Tuple[str, ...]) -> str:
    """Torch state-dict key of the Flax leaf ``variables[collection][path[0]]...[path[-1]]``.

    E.g. ``("params", ("Mixed_5b", "branch1x1", "conv", "kernel")) -> "Mixed_5b.branch1x1.conv.weight"``.
    """
    try:
        leaf = _FLAX_TO_TORCH_LEAF[(collection, path[-1])]
    except KeyError as e:
        raise KeyError(f"no torch name for Flax leaf {collection}/{'/'.join(path)}") from e
    return ".".join(path[:-1] + (leaf,))


def flax_path(name: str) -> Tuple[str, Tuple[str, ...]]:
    """Inverse of :func:`torch_name`: ``"Mixed_5b.branch1x1.bn.running_var" -> ("batch_stats", (..., "var"))``."""
    parts = tuple(name.split("."))
    parent, leaf = parts[-2] if len(parts) > 1 else "", parts[-1]
    if leaf == "weight":
        if parent in ("conv", "fc"):
            return "params", parts[:-1] + ("kernel",)
        if parent == "bn":
            return "params", parts[:-1] + ("scale",)
    elif leaf == "bias" and parent in ("bn", "fc"):
        return "params", parts[:-1] + ("bias",)
    elif leaf == "running_mean" and parent == "bn":
        return "batch_stats", parts[:-1] + ("mean",)
    elif leaf == "running_var" and parent == "bn":
        return "batch_stats", parts[:-1] + ("var",)
    raise KeyError(f"{name!r} is not a parameter of the FID Inception network")


def _torch_to_flax_array(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:      # conv OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:      # linear (out, in) -> (in, out)
        return value.T
    return value


def _flax_to_torch_array(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:      # HWIO -> OIHW
        return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
        return value.T
    return value


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out: Dict[Tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _set_nested(tree: Dict[str, Any], path: Tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


@functools.lru_cache(maxsize=1)
def _flax_variable_shapes() -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """Shapes of every leaf of the full variable tree (``(collection, *path) -> shape``), no FLOPs."""
    model = FIDInceptionV3()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, 3)),
                           logits=True))
    return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def torch_state_dict_spec() -> Dict[str, Tuple[int, ...]]:
    """Every key of the pytorch-fid state dict (minus ``num_batches_tracked``) with its torch shape.

    Derived from the Flax module through :func:`torch_name` (and the OIHW / (out, in) layouts), so it
    is the exact list of what :func:`torch_state_dict_to_flax` consumes and
    :func:`flax_to_torch_state_dict` produces.
    """
    spec = {}
    for (collection, *path), shape in _flax_variable_shapes().items():
        name = torch_name(collection, tuple(path))
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = (shape[1], shape[0])
        spec[name] = shape
    return spec


def torch_state_dict_to_flax(state_dict: Mapping[str, np.ndarray]) -> Variables:
    """pytorch-fid state dict (torch layouts, numpy arrays) -> Flax ``{"params", "batch_stats"}``.

    Strict: every key of :func:`torch_state_dict_spec` must be present with its exact shape, and no
    other key is allowed except BatchNorm ``num_batches_tracked`` (ignored: inference uses the
    running statistics only).
    """
    spec = torch_state_dict_spec()
    given = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(spec) - set(given))
    unexpected = sorted(set(given) - set(spec))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the FID Inception network: "
                         f"{len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    variables: Variables = {}
    for name, value in given.items():
        value = np.asarray(value)
        if tuple(value.shape) != spec[name]:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != expected {spec[name]}")
        collection, path = flax_path(name)
        arr = np.ascontiguousarray(_torch_to_flax_array(name, value), dtype=np.float32)
        _set_nested(variables, (collection,) + path, arr)
    return variables


def flax_to_torch_state_dict(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Inverse of :func:`torch_state_dict_to_flax` (without ``num_batches_tracked``)."""
    out = {}
    for (collection, *path), value in _flatten(variables).items():
        name = torch_name(collection, tuple(path))
        out[name] = np.ascontiguousarray(_flax_to_torch_array(name, np.asarray(value)))
    return out


# ----------------------------------------------------------------------------------------------
# Loading weights (no downloads)
# ----------------------------------------------------------------------------------------------

def _missing_weights_message(path: Optional[str]) -> str:
    where = f"not found at {path!r}" if path else f"no path given and ${FID_WEIGHTS_ENV} is not set"
    return (f"FID Inception weights {where}. FID needs pytorch-fid's weight file "
            f"{FID_WEIGHTS_FILENAME} (sha256 prefix {FID_WEIGHTS_SHA256_PREFIX}), published at "
            f"{FID_WEIGHTS_URL} . Nothing is downloaded at run time: fetch it on a machine with "
            f"internet access, then pass its path (or a .npz made by "
            f"diffusion_jax.evaluation.convert_weights) or set {FID_WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_FILENAME}.")


def resolve_weights_path(path: Optional[str] = None) -> str:
    """The weight file to use: ``path``, else ``$DIFFUSION_JAX_FID_WEIGHTS``; a directory is searched
    for ``pt_inception-2015-12-05-6726825d.pth`` (then ``.npz``). Raises ``FileNotFoundError``."""
    path = path or os.environ.get(FID_WEIGHTS_ENV) or None
    if path is None:
        raise FileNotFoundError(_missing_weights_message(None))
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        stem = os.path.splitext(FID_WEIGHTS_FILENAME)[0]
        for candidate in (FID_WEIGHTS_FILENAME, stem + ".npz"):
            if os.path.isfile(os.path.join(path, candidate)):
                return os.path.join(path, candidate)
        raise FileNotFoundError(_missing_weights_message(os.path.join(path, FID_WEIGHTS_FILENAME)))
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(path))
    return path


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_pth_checked(path: str, verify_checksum: bool) -> Tuple[Dict[str, np.ndarray], str]:
    digest = file_sha256(path)
    if verify_checksum and not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"{path} has sha256 {digest}, which does not start with "
                         f"{FID_WEIGHTS_SHA256_PREFIX}: it is not {FID_WEIGHTS_FILENAME} "
                         f"(from {FID_WEIGHTS_URL}). Refusing to call its features 'FID'.")
    return torch_pickle.load_torch_state_dict(path), digest


def load_torch_layout_weights(path: Optional[str] = None, *,
                              verify_checksum: bool = True) -> Tuple[Dict[str, np.ndarray], str]:
    """The pytorch-fid state dict (torch layouts) from a ``.pth`` or converted ``.npz``, and the sha256
    of the original ``.pth`` it came from."""
    path = resolve_weights_path(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        source = str(arrays.pop("__source_sha256__", np.array("")))
        if verify_checksum and not source.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise ValueError(f"{path} does not record a source file with sha256 prefix "
                             f"{FID_WEIGHTS_SHA256_PREFIX} (recorded: {source!r}); rebuild it with "
                             f"convert_weights from {FID_WEIGHTS_FILENAME}.")
        return arrays, source
    return _read_pth_checked(path, verify_checksum)


def load_inception_weights(path: Optional[str] = None, *, verify_checksum: bool = True) -> Variables:
    """Flax variables ``{"params", "batch_stats"}`` of the FID Inception, as jax arrays.

    ``path``: the original ``pt_inception-2015-12-05-6726825d.pth`` (read without torch; its sha256
    must start with ``6726825d``), a ``.npz`` from :func:`convert_weights`, or a directory holding
    one; ``None`` reads ``$DIFFUSION_JAX_FID_WEIGHTS``. Missing file -> ``FileNotFoundError`` naming
    the file and where to get it. Nothing is downloaded.
    """
    state_dict, _ = load_torch_layout_weights(path, verify_checksum=verify_checksum)
    return jax.tree.map(jnp.asarray, torch_state_dict_to_flax(state_dict))


def convert_weights(pth_path: str, npz_out: str, *, verify_checksum: bool = True) -> str:
    """Read the pytorch-fid ``.pth`` once (checked) and write a torch-layout ``.npz`` that loads fast.

    The ``.npz`` keeps the torch key names and layouts (minus ``num_batches_tracked``) plus
    ``__source_sha256__``, the checksum of the ``.pth`` it came from. Returns ``npz_out``.
    """
    if not os.path.isfile(pth_path):
        raise FileNotFoundError(_missing_weights_message(pth_path))
    state_dict, digest = _read_pth_checked(pth_path, verify_checksum)
    torch_state_dict_to_flax(state_dict)  # validate keys and shapes before writing anything
    arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
              if not k.endswith(".num_batches_tracked")}
    os.makedirs(os.path.dirname(os.path.abspath(npz_out)), exist_ok=True)
    with open(npz_out, "wb") as f:
        np.savez(f, __source_sha256__=np.array(digest), **arrays)
    return npz_out


def init_inception_variables(seed: int = 0) -> Variables:
    """Randomly initialised variables with the full tree (for tests and shape checks; not FID)."""
    model = FIDInceptionV3()
    return model.init(jax.random.key(seed, impl="rbg"),
                      jnp.zeros((1, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, 3)), logits=True)


# ----------------------------------------------------------------------------------------------
# Batched (optionally sharded) feature extraction
# ----------------------------------------------------------------------------------------------

_APPLY_CACHE: Dict[Any, Any] = {}


def _jitted_apply(model: FIDInceptionV3, mesh: Optional[Mesh]):
    key = (model.resize_input, model.normalize_input, jnp.dtype(model.dtype).name, mesh)
    if key not in _APPLY_CACHE:
        def apply(variables, images):
            return model.apply(variables, images)
        if mesh is None:
            _APPLY_CACHE[key] = jax.jit(apply)
        else:
            # Variables replicated, batch split over 'data'; jit partitions the convs (no pmap).
            _APPLY_CACHE[key] = jax.jit(
                apply,
                in_shardings=(NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))),
                out_shardings=NamedSharding(mesh, PartitionSpec("data")))
    return _APPLY_CACHE[key]


def prepare_images(images: Any) -> np.ndarray:
    """NHWC float32 in [0, 1]: uint8 is divided by 255; float input must already lie in [0, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    # A [-1, 1] image passed by mistake would silently shift every feature; refuse it.
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"images must be in [0, 1] (got range [{lo:.3g}, {hi:.3g}]); "
                         "map [-1, 1] data with (x + 1) / 2 first")
    return np.clip(x, 0.0, 1.0)


def inception_features(variables: Variables, images: Any, batch_size: int = 50, *,
                       mesh: Optional[Mesh] = None, dtype: Any = jnp.float32) -> np.ndarray:
    """2048-d pool3 features of NHWC images in [0, 1] (1 or 3 channels), shape ``(n, 2048)`` float32.

    Runs one jitted program per batch shape: the last batch is zero-padded to ``batch_size`` so
    nothing recompiles. With ``mesh`` (a :class:`jax.sharding.Mesh` with a ``'data'`` axis, Auto axis
    type) each batch is split over ``'data'`` with ``NamedSharding`` and the variables are
    replicated; ``batch_size`` must then be a multiple of ``mesh.shape['data']``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = prepare_images(images)
    model = FIDInceptionV3(dtype=dtype)
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}")
        if batch_size % mesh.shape["data"]:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the 'data' axis "
                             f"size {mesh.shape['data']}")
        variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    apply = _jitted_apply(model, mesh)
    n = x.shape[0]
    out = np.empty((n, FEATURE_DIM), np.float32)
    for start in range(0, n, batch_size):
        batch = x[start:start + batch_size]
        m = batch.shape[0]
        if m < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - m,) + batch.shape[1:], batch.dtype)])
        if mesh is not None:
            batch = jax.device_put(batch, batch_sharding)
        out[start:start + m] = np.asarray(apply(variables, batch))[:m]
    return out


__all__ = [
    "FID_WEIGHTS_FILENAME", "FID_WEIGHTS_URL", "FID_WEIGHTS_SHA256_PREFIX", "FID_WEIGHTS_ENV",
    "BasicConv2d", "FIDInceptionA", "InceptionB", "FIDInceptionC", "InceptionD",
    "FIDInceptionE_1", "FIDInceptionE_2", "FIDInceptionV3", "resize_bilinear_torch",
    "torch_name", "flax_path", "torch_state_dict_spec", "torch_state_dict_to_flax",
    "flax_to_torch_state_dict", "resolve_weights_path", "file_sha256", "load_torch_layout_weights",
    "load_inception_weights", "convert_weights", "init_inception_variables", "prepare_images",
    "inception_features",
]
