"""Tests of diffusion_jax.evaluation: Frechet distance, KID, the FID Inception port and its weight I/O.

Every check compares against an independent computation: closed forms for the Frechet distance, a
brute-force double loop for MMD, an architecture table written here from torchvision / pytorch-fid
for the weight keys, a plain numpy forward pass (tests/inception_reference.py) for the network, and
checkpoints assembled here opcode by opcode in torch's on-disk layouts for the reader.
"""
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import inception_reference as ref
from torch_format import _pk_global, torch_save, write_fake_torch_checkpoint, write_state_dict_as_torch
from xla_env import xla_flags
from diffusion_jax.evaluation import fid as fidlib
from diffusion_jax.evaluation import inception as inc
from diffusion_jax.evaluation import torch_pickle
from diffusion_jax.evaluation.features import PIXELS, frechet_distance_in, kid_in

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ================================================================================================
# Frechet distance
# ================================================================================================

@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_matches_closed_form_for_commuting_covariances(method):
    # For S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d^2 = ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got_diag = fidlib.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got_rot = fidlib.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T, method=method)
    assert got_diag == pytest.approx(expected, rel=1e-10)
    assert got_rot == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_2x2_non_commuting(method):
    # For 2x2 M with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.0, 0.5])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    assert fidlib.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-10)


def test_fid_from_features_identical_symmetric_and_singular():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 16))
    b = 0.8 * rng.normal(size=(300, 16)) + 0.5
    assert abs(fidlib.fid_from_features(a, a)) < 1e-9
    ab, ba = fidlib.fid_from_features(a, b), fidlib.fid_from_features(b, a)
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-10)
    assert fidlib.fid_from_features(a, b, method="sqrtm") == pytest.approx(ab, rel=1e-8)
    # Fewer samples than dimensions: rank-deficient covariances, still finite and ~0 against itself.
    few = rng.normal(size=(10, 64))
    assert abs(fidlib.fid_from_features(few, few)) < 1e-10
    assert np.isfinite(fidlib.fid_from_features(few, rng.normal(size=(12, 64))))


def test_feature_statistics_matches_numpy():
    f = np.random.default_rng(2).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = fidlib.feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)


def test_reference_statistics_cache(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(100, 5))
    calls = []

    def compute():
        calls.append(1)
        return feats

    path = str(tmp_path / "ref" / "stats.npz")
    first = fidlib.compute_reference_statistics(path, compute, feature_space="pixels")
    second = fidlib.compute_reference_statistics(path, compute, feature_space="pixels")
    assert len(calls) == 1 and second.num_samples == 100 and second.feature_space == "pixels"
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_allclose(second.mu, feats.mean(0))
    assert second.frechet_distance(feats) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="inception-pool3"):
        fidlib.compute_reference_statistics(path, compute, feature_space="inception-pool3")


def test_pixel_feature_space_is_named_and_correct():
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(200, 8, 8, 1))
    y = np.clip(x + 0.1, 0, 1)
    out = frechet_distance_in(PIXELS, x, y)
    assert list(out) == ["fd-pixels"]
    assert out["fd-pixels"] == pytest.approx(fidlib.fid_from_features(x.reshape(200, 64), y.reshape(200, 64)))
    stats = fidlib.ReferenceStatistics(*fidlib.feature_statistics(y.reshape(200, -1)), 200, "pixels")
    assert frechet_distance_in(PIXELS, x, stats)["fd-pixels"] == pytest.approx(out["fd-pixels"])
    k = kid_in(PIXELS, x, y, num_subsets=3, subset_size=50)
    assert set(k) == {"kid-pixels", "kid-pixels-std"}


# ================================================================================================
# KID
# ================================================================================================

def _mmd2_brute_force(x, y):
    def k(u, v):
        return (float(np.dot(u, v)) / len(u) + 1.0) ** 3
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_and_kid_match_brute_force():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3
    assert fidlib.mmd2_unbiased(x, y) == pytest.approx(_mmd2_brute_force(x, y), rel=1e-12)
    # One subset holding every row of equal-size sets = the full statistic (it is permutation invariant).
    x2 = rng.normal(size=(9, 5))
    mean, std = fidlib.kid_from_features(x2, y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(_mmd2_brute_force(x2, y), rel=1e-12) and std == 0.0


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    shifted = rng.normal(size=(600, 8)) + 0.5
    same_mean, same_std = fidlib.kid_from_features(a, b, num_subsets=20, subset_size=200)
    diff_mean, _ = fidlib.kid_from_features(a, shifted, num_subsets=20, subset_size=200)
    # Unbiased estimator: centred on 0 for equal laws (can be slightly negative).
    assert abs(same_mean) < max(3 * same_std, 0.02)
    assert diff_mean > 10 * max(abs(same_mean), same_std)


# ================================================================================================
# Architecture: every key and shape of the pytorch-fid state dict
# ================================================================================================

def _conv(name, cin, cout, kh, kw):
    return [(name, cin, cout, kh, kw)]


def _block_a(p, cin, pool):
    return (_conv(p + ".branch1x1", cin, 64, 1, 1) + _conv(p + ".branch5x5_1", cin, 48, 1, 1)
            + _conv(p + ".branch5x5_2", 48, 64, 5, 5) + _conv(p + ".branch3x3dbl_1", cin, 64, 1, 1)
            + _conv(p + ".branch3x3dbl_2", 64, 96, 3, 3) + _conv(p + ".branch3x3dbl_3", 96, 96, 3, 3)
            + _conv(p + ".branch_pool", cin, pool, 1, 1))


def _block_c(p, c7):
    return (_conv(p + ".branch1x1", 768, 192, 1, 1) + _conv(p + ".branch7x7_1", 768, c7, 1, 1)
            + _conv(p + ".branch7x7_2", c7, c7, 1, 7) + _conv(p + ".branch7x7_3", c7, 192, 7, 1)
            + _conv(p + ".branch7x7dbl_1", 768, c7, 1, 1) + _conv(p + ".branch7x7dbl_2", c7, c7, 7, 1)
            + _conv(p + ".branch7x7dbl_3", c7, c7, 1, 7) + _conv(p + ".branch7x7dbl_4", c7, c7, 7, 1)
            + _conv(p + ".branch7x7dbl_5", c7, 192, 1, 7) + _conv(p + ".branch_pool", 768, 192, 1, 1))


def _block_e(p, cin):
    return (_conv(p + ".branch1x1", cin, 320, 1, 1) + _conv(p + ".branch3x3_1", cin, 384, 1, 1)
            + _conv(p + ".branch3x3_2a", 384, 384, 1, 3) + _conv(p + ".branch3x3_2b", 384, 384, 3, 1)
            + _conv(p + ".branch3x3dbl_1", cin, 448, 1, 1) + _conv(p + ".branch3x3dbl_2", 448, 384, 3, 3)
            + _conv(p + ".branch3x3dbl_3a", 384, 384, 1, 3) + _conv(p + ".branch3x3dbl_3b", 384, 384, 3, 1)
            + _conv(p + ".branch_pool", cin, 192, 1, 1))


# torchvision Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's A/C/E blocks.
ARCHITECTURE = (
    _conv("Conv2d_1a_3x3", 3, 32, 3, 3) + _conv("Conv2d_2a_3x3", 32, 32, 3, 3)
    + _conv("Conv2d_2b_3x3", 32, 64, 3, 3) + _conv("Conv2d_3b_1x1", 64, 80, 1, 1)
    + _conv("Conv2d_4a_3x3", 80, 192, 3, 3)
    + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
    + _conv("Mixed_6a.branch3x3", 288, 384, 3, 3) + _conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1)
    + _conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3) + _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)
    + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160)
    + _block_c("Mixed_6e", 192)
    + _conv("Mixed_7a.branch3x3_1", 768, 192, 1, 1) + _conv("Mixed_7a.branch3x3_2", 192, 320, 3, 3)
    + _conv("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1) + _conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    + _conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1) + _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)
    + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048)
)


def expected_state_dict_shapes():
    shapes = {}
    for name, cin, cout, kh, kw in ARCHITECTURE:
        shapes[name + ".conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (cout,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_architecture_table_is_consistent():
    # Channel bookkeeping of the table itself: each block's concat width feeds the next block.
    out = {}
    for name, cin, cout, kh, kw in ARCHITECTURE:
        out[name] = cout
    width = lambda p, branches, passthrough=0: sum(out[f"{p}.{b}"] for b in branches) + passthrough  # noqa: E731
    assert width("Mixed_5b", ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]) == 256
    assert width("Mixed_5d", ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]) == 288
    assert width("Mixed_6a", ["branch3x3", "branch3x3dbl_3"], 288) == 768
    assert width("Mixed_6e", ["branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"]) == 768
    assert width("Mixed_7a", ["branch3x3_2", "branch7x7x3_4"], 768) == 1280
    assert width("Mixed_7c", ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a",
                              "branch3x3dbl_3b", "branch_pool"]) == 2048
    assert len(ARCHITECTURE) == 94


def test_state_dict_spec_is_the_pytorch_fid_state_dict():
    expected = expected_state_dict_shapes()
    spec = inc.torch_state_dict_spec()
    assert spec == expected
    # 94 BasicConv2d x (conv weight + 4 BN tensors) + fc weight/bias = 472 keys.
    assert len(expected) == 94 * 5 + 2
    conv = sum(cout * cin * kh * kw for _, cin, cout, kh, kw in ARCHITECTURE)
    bn = 4 * sum(cout for _, _, cout, _, _ in ARCHITECTURE)
    fc = 1008 * 2048 + 1008
    total = sum(int(np.prod(s)) for s in expected.values())
    assert total == conv + bn + fc == 23_885_392


def test_flax_tree_to_torch_names_is_a_bijection():
    import jax
    import jax.numpy as jnp
    model = inc.FIDInceptionV3()
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)), logits=True))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    expected = expected_state_dict_shapes()
    names = []
    for path, leaf in leaves:
        keys = tuple(p.key for p in path)
        collection, rest = keys[0], keys[1:]
        name = inc.torch_name(collection, rest)
        names.append(name)
        assert inc.flax_path(name) == (collection, rest)          # inverse
        shape = leaf.shape
        torch_shape = {4: lambda s: (s[3], s[2], s[0], s[1]), 2: lambda s: (s[1], s[0])}.get(
            len(shape), lambda s: s)(shape)
        assert expected[name] == tuple(torch_shape), name
    assert len(names) == len(set(names)) == len(expected)        # injective and onto
    assert set(names) == set(expected)


def random_torch_state_dict(seed=0):
    """He-scaled convs and mild BN statistics so activations stay O(1) through all 94 layers."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in expected_state_dict_shapes().items():
        if k.endswith("conv.weight"):
            v = rng.normal(size=s) * np.sqrt(2.0 / (s[1] * s[2] * s[3]))
        elif k.endswith("bn.weight"):
            v = rng.uniform(0.8, 1.2, s)
        elif k.endswith("bn.bias"):
            v = rng.normal(0.0, 0.2, s)
        elif k.endswith("running_mean"):
            v = rng.normal(0.0, 0.1, s)
        elif k.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, s)
        elif k == "fc.weight":
            v = rng.normal(size=s) / np.sqrt(2048)
        else:
            v = rng.normal(0.0, 0.1, s)
        sd[k] = v.astype(np.float32)
    return sd


def test_state_dict_round_trip_and_strictness():
    sd = random_torch_state_dict(1)
    sd_with_counters = dict(sd)
    for name, *_ in ARCHITECTURE:
        sd_with_counters[name + ".bn.num_batches_tracked"] = np.array(0, np.int64)
    variables = inc.torch_state_dict_to_flax(sd_with_counters)
    # Layout facts checked directly: OIHW -> HWIO, (out, in) -> (in, out), BN stats in batch_stats.
    np.testing.assert_array_equal(variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                  sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"])
    back = inc.flax_to_torch_state_dict(variables)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    broken = dict(sd)
    del broken["Mixed_5b.branch_pool.bn.running_mean"]
    with pytest.raises(ValueError, match="missing"):
        inc.torch_state_dict_to_flax(broken)
    broken = dict(sd, **{"Mixed_5b.branch_pool.conv.weight": np.zeros((32, 192, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        inc.torch_state_dict_to_flax(broken)
    with pytest.raises(ValueError, match="unexpected"):
        inc.torch_state_dict_to_flax(dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768))}))


# ================================================================================================
# Torch checkpoint reader (files from tests/torch_format.py)
# ================================================================================================

@pytest.mark.parametrize("fmt,root", [("zip", "archive"), ("zip", "pt_inception-2015-12-05-6726825d"),
                                      ("legacy", None)])
def test_torch_pickle_reader_round_trip(tmp_path, fmt, root):
    base = np.arange(12, dtype=np.float32) * 0.5 - 1.0
    storages = {"0": base, "1": np.array([7], np.int64), "2": np.linspace(0, 1, 6),
                "3": np.array([-3, 4, 5], np.int32), "4": np.array([0.5, -2.0], np.float16)}
    tensors = [("w", "0", 0, (3, 4), (4, 1)),            # contiguous
               ("w_t", "0", 0, (4, 3), (1, 4)),          # transposed view of the same storage
               ("every_other", "0", 2, (5,), (2,)),      # offset + stride
               ("num_batches_tracked", "1", 0, (), ()),  # 0-d int64
               ("d", "2", 0, (2, 3), (3, 1)), ("i", "3", 0, (3,), (1,)), ("h", "4", 0, (2,), (1,))]
    path = str(tmp_path / "ckpt.pth")
    write_fake_torch_checkpoint(path, storages, tensors, fmt=fmt, root=root or "archive")
    with open(path, "rb") as f:
        head = f.read(4)
    assert head == (b"PK\x03\x04" if fmt == "zip" else b"\x80\x02\x8a\x0a")
    sd = torch_pickle.load_torch_state_dict(path)
    assert list(sd) == [t[0] for t in tensors]
    np.testing.assert_array_equal(sd["w"], base.reshape(3, 4))
    np.testing.assert_array_equal(sd["w_t"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["every_other"], base[2::2])
    assert sd["num_batches_tracked"].shape == () and sd["num_batches_tracked"].dtype == np.int64
    assert int(sd["num_batches_tracked"]) == 7
    np.testing.assert_array_equal(sd["d"], np.linspace(0, 1, 6).reshape(2, 3))
    assert sd["d"].dtype == np.float64 and sd["i"].dtype == np.int32 and sd["h"].dtype == np.float16
    np.testing.assert_array_equal(sd["i"], [-3, 4, 5])
    np.testing.assert_array_equal(sd["h"], [0.5, -2.0])
    sd["w"][0, 0] = 99.0                                  # results are independent copies
    assert sd["w_t"][0, 0] == base[0]


def test_torch_save_writer_round_trip(tmp_path):
    """tests/torch_format.torch_save (what the interop tests build peer checkpoints with) writes nested
    containers, scalars, strings and float32 / int64 / 0-d / empty tensors that the reader returns unchanged."""
    import collections
    sd = collections.OrderedDict([("w", np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5),
                                  ("n", np.array(7, np.int64)), ("e", np.zeros((0, 3), np.float32))])
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    obj = {"model": sd, "opt": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "fused": None,
                                                                 "amsgrad": False, "params": [0, 1, 2]}]},
           "shadow": [np.full((2, 2), 0.25, np.float32)], "step": 12, "name": "psld", "x": np.float64(0.5)}
    path = str(tmp_path / "obj.pth")
    torch_save(obj, path)
    back = torch_pickle.load_torch_checkpoint(path)
    assert list(back) == list(obj) and isinstance(back["model"], collections.OrderedDict)
    assert list(back["model"]) == ["w", "n", "e"]
    for k in sd:
        assert back["model"][k].dtype == sd[k].dtype and back["model"][k].shape == sd[k].shape
        np.testing.assert_array_equal(back["model"][k], sd[k])
    assert back["opt"] == obj["opt"] and back["step"] == 12 and back["name"] == "psld"
    assert type(back["x"]) is float and back["x"] == 0.5                    # numpy scalars become Python numbers
    np.testing.assert_array_equal(back["shadow"][0], obj["shadow"][0])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_pickle_reader_refuses_other_globals(tmp_path, fmt):
    path = str(tmp_path / "evil.pth")
    write_fake_torch_checkpoint(path, {"0": np.zeros(2, np.float32)}, [("w", "0", 0, (2,), (1,))],
                                fmt=fmt, extra_global=("os", "system"))
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="os.system"):
        torch_pickle.load_torch_state_dict(path)
    # A storage class outside the allowlist is refused as well.
    obj = b"\x80\x02" + _pk_global("torch", "FooStorage") + b"."
    with zipfile.ZipFile(str(tmp_path / "e2.pth"), "w") as zf:
        zf.writestr("archive/data.pkl", obj)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="torch.FooStorage"):
        torch_pickle.load_torch_checkpoint(str(tmp_path / "e2.pth"))


# ================================================================================================
# Resize: jax.image.resize(bilinear, antialias=False) == torch bilinear, align_corners=False
# ================================================================================================

@pytest.mark.parametrize("hw", [(16, 16), (7, 13), (32, 32), (299, 299), (300, 300), (600, 450)])
def test_resize_matches_torch_bilinear_formula(hw):
    import jax
    import jax.numpy as jnp
    x = np.random.default_rng(7).uniform(size=(2,) + hw + (3,))
    expected = ref.resize_bilinear_nchw(x.transpose(0, 3, 1, 2), 299, 299).transpose(0, 2, 3, 1)
    # float64 shows the formulas are identical (differences are rounding only) ...
    with jax.enable_x64(True):
        got64 = np.asarray(inc.resize_bilinear_torch(jnp.asarray(x), 299))
    assert got64.dtype == np.float64
    np.testing.assert_allclose(got64, expected, atol=1e-12, rtol=0)
    # ... and the float32 path the network uses stays within float32 position rounding.
    got32 = np.asarray(inc.resize_bilinear_torch(jnp.asarray(x, jnp.float32), 299))
    np.testing.assert_allclose(got32, expected, atol=2e-4, rtol=0)


# ================================================================================================
# Numerical parity of the Flax port with the numpy reference, through the .pth loader
# ================================================================================================

def test_flax_port_matches_numpy_reference_through_pth_loader(tmp_path):
    sd = random_torch_state_dict(0)
    with_counters = dict(sd, **{f"{n}.bn.num_batches_tracked": np.array(0, np.int64) for n, *_ in ARCHITECTURE})
    pth = str(tmp_path / inc.FID_WEIGHTS_FILENAME)
    write_state_dict_as_torch(pth, with_counters, fmt="zip")
    # The fake's sha256 is not 6726825d...: the checked loader must refuse to call it FID weights.
    with pytest.raises(ValueError, match="6726825d"):
        inc.load_inception_weights(pth)
    variables = inc.load_inception_weights(pth, verify_checksum=False)
    npz = inc.convert_weights(pth, str(tmp_path / "w.npz"), verify_checksum=False)
    with pytest.raises(ValueError, match="6726825d"):
        inc.load_inception_weights(npz)

    rng = np.random.default_rng(8)
    images = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    expected = ref.fid_inception_pool3(sd, images.transpose(0, 3, 1, 2))
    got = inc.inception_features(variables, images, batch_size=2)
    assert got.shape == (2, 2048)
    # Non-degenerate activations (so the comparison is not vacuous), then float32 vs float64 parity.
    assert expected.std() > 0.5 and (expected > 0).mean() > 0.5 and np.abs(expected).max() < 100
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The npz path gives the identical variables.
    import jax
    from_npz = inc.load_inception_weights(npz, verify_checksum=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), variables, from_npz))


def test_sharded_features_and_grayscale_in_subprocess(tmp_path):
    """Two fake CPU devices, 'data' mesh axis: 1-channel images sharded == 3-channel copies unsharded."""
    npz = str(tmp_path / "w.npz")
    np.savez(npz, **random_torch_state_dict(2))
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = {xla_flags(2)!r}
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, numpy as np
        from jax.sharding import AxisType
        from diffusion_jax.evaluation import inception as inc
        assert jax.device_count() == 2
        v = inc.load_inception_weights({npz!r}, verify_checksum=False)
        gray = np.random.default_rng(0).integers(0, 256, size=(3, 12, 12, 1)).astype(np.uint8)
        mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
        sharded = inc.inception_features(v, gray, batch_size=2, mesh=mesh)
        plain = inc.inception_features(v, np.repeat(gray, 3, -1).astype(np.float32) / 255.0, batch_size=4)
        assert sharded.shape == (3, 2048), sharded.shape
        print("MAXDIFF", float(np.abs(sharded - plain).max()), float(np.abs(plain).max()))
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("MAXDIFF")][0]
    diff, scale = map(float, line.split()[1:])
    assert scale > 0.5 and diff < 1e-4, line


def test_prepare_images_checks_range_and_scales_uint8():
    np.testing.assert_allclose(inc.prepare_images(np.full((1, 4, 4, 3), 255, np.uint8)), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inc.prepare_images(np.full((1, 4, 4, 3), -0.5, np.float32))
    with pytest.raises(ValueError, match="channels"):
        inc.prepare_images(np.zeros((1, 4, 4, 2), np.float32))


# ================================================================================================
# Weights files
# ================================================================================================

def test_missing_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.FID_WEIGHTS_ENV, raising=False)
    for arg in (None, str(tmp_path / "nope.pth"), str(tmp_path)):
        with pytest.raises(FileNotFoundError) as e:
            inc.load_inception_weights(arg)
        msg = str(e.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in msg
        assert inc.FID_WEIGHTS_URL in msg and "DIFFUSION_JAX_FID_WEIGHTS" in msg
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inc.convert_weights(str(tmp_path / "nope.pth"), str(tmp_path / "out.npz"))


def test_real_fid_weights_if_available():
    path = os.environ.get(inc.FID_WEIGHTS_ENV)
    if not path:
        pytest.skip(f"set {inc.FID_WEIGHTS_ENV} to pytorch-fid's {inc.FID_WEIGHTS_FILENAME} "
                    f"(or a .npz from convert_weights) to test the real FID network; it is not shipped "
                    f"and nothing is downloaded ({inc.FID_WEIGHTS_URL})")
    real = inc.resolve_weights_path(path)
    if real.endswith(".pth"):
        assert inc.file_sha256(real).startswith("6726825d")
    state_dict, source_sha = inc.load_torch_layout_weights(real)          # verified (raises otherwise)
    assert source_sha.startswith("6726825d")
    variables = inc.load_inception_weights(real)
    rng = np.random.default_rng(9)
    images = rng.uniform(size=(6, 32, 32, 3)).astype(np.float32)
    feats = inc.inception_features(variables, images, batch_size=6)
    assert feats.shape == (6, 2048) and np.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU means
    assert abs(fidlib.fid_from_features(feats, feats)) < 1e-6 * max(1.0, float(np.trace(np.cov(feats.T))))
    # The real network against the independent numpy forward pass, on two of the images.
    expected = ref.fid_inception_pool3(state_dict, images[:2].transpose(0, 3, 1, 2))
    np.testing.assert_allclose(feats[:2], expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
