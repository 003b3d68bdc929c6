"""Plain-numpy forward pass of pytorch-fid's FID Inception-v3, for testing the Flax port.

Written independently of ``diffusion_jax.evaluation.inception``: it consumes the *torch* state dict
(names as in pytorch-fid, conv weights OIHW, activations NCHW) and follows torchvision's
``Inception3`` with pytorch-fid's patched blocks, op by op, in float64:

* conv via im2col + one matrix product, explicit symmetric zero padding and stride;
* BatchNorm in inference mode, ``(x - running_mean) / sqrt(running_var + 1e-3) * weight + bias``;
* ``F.avg_pool2d(3, 1, 1, count_include_pad=False)``: window sum of the zero-padded input divided by
  the number of in-image positions in the window;
* ``F.max_pool2d`` with -inf padding, floor mode;
* ``F.interpolate(size=299, mode="bilinear", align_corners=False)``: per axis
  ``s = max((i + 1/2) in/out - 1/2, 0)``, ``i0 = floor(s)``, ``i1 = min(i0 + 1, in - 1)``,
  ``out = (1 - (s - i0)) x[i0] + (s - i0) x[i1]``.
"""
from __future__ import annotations

from typing import Mapping, Tuple

import numpy as np

Array = np.ndarray


def torch_bilinear_matrix(n_in: int, n_out: int) -> Array:
    """(n_out, n_in) interpolation matrix of torch's bilinear, align_corners=False, no antialias."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        s = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = s - i0
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m


def resize_bilinear_nchw(x: Array, out_h: int, out_w: int) -> Array:
    rh = torch_bilinear_matrix(x.shape[2], out_h)
    rw = torch_bilinear_matrix(x.shape[3], out_w)
    return np.einsum("ph,nchw,qw->ncpq", rh, x, rw, optimize=True)


def conv2d_nchw(x: Array, w: Array, stride: Tuple[int, int], padding: Tuple[int, int]) -> Array:
    """Cross-correlation as torch.nn.Conv2d (no bias): x (N, C, H, W), w (O, C, kh, kw)."""
    n, c, h, wd = x.shape
    o, c2, kh, kw = w.shape
    assert c == c2, (c, c2)
    sh, sw = stride
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (wd + 2 * pw - kw) // sw + 1
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]   # (N, C, ho, wo)
            cols[:, i, j] = patch.transpose(1, 0, 2, 3)
    out = w.reshape(o, c * kh * kw) @ cols.reshape(c * kh * kw, n * ho * wo)
    return out.reshape(o, n, ho, wo).transpose(1, 0, 2, 3)


def basic_conv(sd: Mapping[str, Array], name: str, x: Array, stride=(1, 1), padding=(0, 0)) -> Array:
    y = conv2d_nchw(x, sd[name + ".conv.weight"], stride, padding)
    g, b = sd[name + ".bn.weight"], sd[name + ".bn.bias"]
    mean, var = sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"]
    y = (y - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
    y = y * g[None, :, None, None] + b[None, :, None, None]
    return np.maximum(y, 0.0)


def _window_sum(xp: Array, k: int, stride: int, ho: int, wo: int, reduce) -> Array:
    acc = None
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            acc = patch.copy() if acc is None else reduce(acc, patch)
    return acc


def avg_pool_3x3_s1_p1_exclude_pad(x: Array) -> Array:
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    total = _window_sum(xp, 3, 1, h, w, np.add)
    ones = np.pad(np.ones((1, 1, h, w)), ((0, 0), (0, 0), (1, 1), (1, 1)))
    count = _window_sum(ones, 3, 1, h, w, np.add)
    return total / count


def max_pool(x: Array, k: int, stride: int, pad: int) -> Array:
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    return _window_sum(xp, k, stride, ho, wo, np.maximum)


def inception_a(sd, p, x):
    b1 = basic_conv(sd, p + ".branch1x1", x)
    b5 = basic_conv(sd, p + ".branch5x5_2", basic_conv(sd, p + ".branch5x5_1", x), padding=(2, 2))
    b3 = basic_conv(sd, p + ".branch3x3dbl_1", x)
    b3 = basic_conv(sd, p + ".branch3x3dbl_2", b3, padding=(1, 1))
    b3 = basic_conv(sd, p + ".branch3x3dbl_3", b3, padding=(1, 1))
    bp = basic_conv(sd, p + ".branch_pool", avg_pool_3x3_s1_p1_exclude_pad(x))
    return np.concatenate([b1, b5, b3, bp], axis=1)


def inception_b(sd, p, x):
    b3 = basic_conv(sd, p + ".branch3x3", x, stride=(2, 2))
    bd = basic_conv(sd, p + ".branch3x3dbl_1", x)
    bd = basic_conv(sd, p + ".branch3x3dbl_2", bd, padding=(1, 1))
    bd = basic_conv(sd, p + ".branch3x3dbl_3", bd, stride=(2, 2))
    return np.concatenate([b3, bd, max_pool(x, 3, 2, 0)], axis=1)


def inception_c(sd, p, x):
    b1 = basic_conv(sd, p + ".branch1x1", x)
    b7 = basic_conv(sd, p + ".branch7x7_1", x)
    b7 = basic_conv(sd, p + ".branch7x7_2", b7, padding=(0, 3))
    b7 = basic_conv(sd, p + ".branch7x7_3", b7, padding=(3, 0))
    bd = basic_conv(sd, p + ".branch7x7dbl_1", x)
    bd = basic_conv(sd, p + ".branch7x7dbl_2", bd, padding=(3, 0))
    bd = basic_conv(sd, p + ".branch7x7dbl_3", bd, padding=(0, 3))
    bd = basic_conv(sd, p + ".branch7x7dbl_4", bd, padding=(3, 0))
    bd = basic_conv(sd, p + ".branch7x7dbl_5", bd, padding=(0, 3))
    bp = basic_conv(sd, p + ".branch_pool", avg_pool_3x3_s1_p1_exclude_pad(x))
    return np.concatenate([b1, b7, bd, bp], axis=1)


def inception_d(sd, p, x):
    b3 = basic_conv(sd, p + ".branch3x3_2", basic_conv(sd, p + ".branch3x3_1", x), stride=(2, 2))
    b7 = basic_conv(sd, p + ".branch7x7x3_1", x)
    b7 = basic_conv(sd, p + ".branch7x7x3_2", b7, padding=(0, 3))
    b7 = basic_conv(sd, p + ".branch7x7x3_3", b7, padding=(3, 0))
    b7 = basic_conv(sd, p + ".branch7x7x3_4", b7, stride=(2, 2))
    return np.concatenate([b3, b7, max_pool(x, 3, 2, 0)], axis=1)


def inception_e(sd, p, x, pool: str):
    b1 = basic_conv(sd, p + ".branch1x1", x)
    b3 = basic_conv(sd, p + ".branch3x3_1", x)
    b3 = np.concatenate([basic_conv(sd, p + ".branch3x3_2a", b3, padding=(0, 1)),
                         basic_conv(sd, p + ".branch3x3_2b", b3, padding=(1, 0))], axis=1)
    bd = basic_conv(sd, p + ".branch3x3dbl_1", x)
    bd = basic_conv(sd, p + ".branch3x3dbl_2", bd, padding=(1, 1))
    bd = np.concatenate([basic_conv(sd, p + ".branch3x3dbl_3a", bd, padding=(0, 1)),
                         basic_conv(sd, p + ".branch3x3dbl_3b", bd, padding=(1, 0))], axis=1)
    pooled = avg_pool_3x3_s1_p1_exclude_pad(x) if pool == "avg" else max_pool(x, 3, 1, 1)
    bp = basic_conv(sd, p + ".branch_pool", pooled)
    return np.concatenate([b1, b3, bd, bp], axis=1)


def fid_inception_pool3(sd: Mapping[str, Array], images_nchw: Array) -> Array:
    """pytorch-fid ``InceptionV3(output_blocks=[3])`` on NCHW images in [0, 1] -> (N, 2048) float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = np.asarray(images_nchw, np.float64)
    x = resize_bilinear_nchw(x, 299, 299)
    x = 2.0 * x - 1.0
    x = basic_conv(sd, "Conv2d_1a_3x3", x, stride=(2, 2))
    x = basic_conv(sd, "Conv2d_2a_3x3", x)
    x = basic_conv(sd, "Conv2d_2b_3x3", x, padding=(1, 1))
    x = max_pool(x, 3, 2, 0)
    x = basic_conv(sd, "Conv2d_3b_1x1", x)
    x = basic_conv(sd, "Conv2d_4a_3x3", x)
    x = max_pool(x, 3, 2, 0)
    x = inception_a(sd, "Mixed_5b", x)
    x = inception_a(sd, "Mixed_5c", x)
    x = inception_a(sd, "Mixed_5d", x)
    x = inception_b(sd, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = inception_c(sd, name, x)
    x = inception_d(sd, "Mixed_7a", x)
    x = inception_e(sd, "Mixed_7b", x, pool="avg")
    x = inception_e(sd, "Mixed_7c", x, pool="max")
    assert x.shape[1:] == (2048, 8, 8), x.shape
    return x.mean(axis=(2, 3))
