"""Frechet distance between Gaussian fits of feature sets, reference statistics, and KID.

All of it runs on the host in float64 numpy: the features are small (n x d with d <= 2048) and the
matrix square root needs the precision.

Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2)::

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

``tr((S1 S2)^{1/2})`` is the sum of the square roots of the eigenvalues of ``S1 S2``, which are those
of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}`` (AB and BA share eigenvalues), i.e. the sum of
the singular values (nuclear norm) of ``S1^{1/2} S2^{1/2}``. The default ``method="eigh"`` uses that
form: PSD square roots from symmetric eigendecompositions (eigenvalues clipped at 0), then one SVD. It
is real by construction, needs no ``eps`` ridge, and stays accurate to ~1e-12 relative even for
singular covariances (fewer samples than dimensions). ``method="sqrtm"``
reproduces pytorch-fid: ``scipy.linalg.sqrtm(S1 @ S2)``, retried with ``eps I`` added to both
covariances when the result is not finite, imaginary parts dropped when they are numerically zero.

Called "FID" only when the features are the pool3 features of the FID Inception weights; in any
other feature space it is "the Frechet distance in <that space>" (see :mod:`.features`).

KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD with the cubic polynomial
kernel ``k(x, y) = (x.y / d + 1)^3``::

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n)

averaged over random subsets (drawn without replacement within a subset), reported with its
standard deviation over subsets.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import scipy.linalg


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``ddof = 1``) of ``features`` ``(n, d)``, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n >= 2, d), got {f.shape}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


class StreamingStatistics:
    """Mean and unbiased covariance of features that arrive in batches, in float64, without keeping them.

    Chan et al.'s pairwise update: each batch contributes its count n_b, mean m_b and centred scatter
    M_b = sum (x - m_b)(x - m_b)^T, merged as

        n = n_a + n_b,   m = m_a + (n_b / n) delta,   M = M_a + M_b + (n_a n_b / n) delta delta^T,   delta = m_b - m_a,

    which equals the all-at-once result up to float64 rounding (no cancellation of large raw sums), so 50k
    samples' statistics never need the 50k features in memory. ``statistics()`` returns (mu, M / (n - 1)).
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.mean = None if dim is None else np.zeros(dim)
        self.scatter = None if dim is None else np.zeros((dim, dim))

    def update(self, features: np.ndarray) -> "StreamingStatistics":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 1:
            raise ValueError(f"a batch of features must have shape (n >= 1, d), got {f.shape}")
        if self.mean is None:
            self.mean, self.scatter = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        if f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dimension {f.shape[1]} differs from the earlier batches' {self.mean.shape[0]}")
        nb = f.shape[0]
        mb = f.mean(axis=0)
        c = f - mb
        n = self.n + nb
        delta = mb - self.mean
        self.scatter = self.scatter + c.T @ c + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n
        return self

    def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 features for a covariance, got {self.n}")
        return self.mean.copy(), self.scatter / (self.n - 1)


def load_published_statistics(path: str, feature_space: str = "inception-pool3") -> "ReferenceStatistics":
    """Reference statistics in the published ``.npz`` format (``mu`` (d,), ``sigma`` (d, d)), e.g. the CIFAR-10
    training-set statistics of pytorch-fid / EDM; checked for shapes, finiteness and symmetry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found: pass an .npz with arrays 'mu' (d,) and "
                                f"'sigma' (d, d) in the published pytorch-fid format")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz file with 'mu' and 'sigma'") from e
    with z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}: the published format has arrays 'mu' (d,) and 'sigma' (d, d); "
                             f"it holds {sorted(z.files)}")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        n = int(z["num_samples"]) if "num_samples" in z.files else 0
        space = str(z["feature_space"]) if "feature_space" in z.files else feature_space
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{path}: mu and sigma must be finite")
    if np.max(np.abs(sigma - sigma.T)) > 1e-6 * max(1.0, np.max(np.abs(sigma))):
        raise ValueError(f"{path}: sigma is not symmetric (max asymmetry {np.max(np.abs(sigma - sigma.T)):.3g})")
    return ReferenceStatistics(mu, sigma, n, space)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr (S1^{1/2} S2 S1^{1/2})^{1/2} = sum of singular values of A = S1^{1/2} S2^{1/2} (A A^T is that
    # matrix). Taking singular values of A instead of square roots of eigenvalues of A A^T avoids the
    # sqrt(eps) error that zero eigenvalues would otherwise contribute for singular covariances.
    a = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
    return float(np.linalg.svd(a, compute_uv=False).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product: the usual fix is a small ridge on both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` in float64 (see the module docstring).

    ``method``: ``"eigh"`` (symmetric form, robust to singular covariances) or ``"sqrtm"``
    (pytorch-fid's computation, with the ``eps`` ridge retry). The value is returned as computed;
    rounding can make it slightly negative (~1e-10 relative) for identical statistics.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray, *, method: str = "eigh",
                      eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussian fits of two feature sets ``(n_a, d)`` and ``(n_b, d)``.

    This is FID when both are FID-Inception pool3 features; otherwise name it by its feature space.
    """
    mu1, s1 = feature_statistics(features_a)
    mu2, s2 = feature_statistics(features_b)
    return frechet_distance(mu1, s1, mu2, s2, method=method, eps=eps)


# ----------------------------------------------------------------------------------------------
# Reference statistics on disk
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ReferenceStatistics:
    """Gaussian fit of a reference feature set, with the name of the feature space it lives in."""
    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    feature_space: str

    def frechet_distance(self, features: np.ndarray, *, method: str = "eigh") -> float:
        """Frechet distance between the Gaussian fit of ``features`` and this reference."""
        mu, sigma = feature_statistics(features)
        return frechet_distance(mu, sigma, self.mu, self.sigma, method=method)


def save_statistics(path: str, stats: ReferenceStatistics) -> str:
    """Write ``stats`` to ``path`` (.npz: mu, sigma, num_samples, feature_space) atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(stats.num_samples),
                     feature_space=np.array(stats.feature_space))
        os.replace(tmp, path)  # readers never see a half-written cache
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_statistics(path: str, feature_space: Optional[str] = None) -> ReferenceStatistics:
    """Read statistics written by :func:`save_statistics`; if ``feature_space`` is given it must match."""
    with np.load(path, allow_pickle=False) as z:
        stats = ReferenceStatistics(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                                    num_samples=int(z["num_samples"]), feature_space=str(z["feature_space"]))
    if feature_space is not None and stats.feature_space != feature_space:
        raise ValueError(f"{path} holds statistics in feature space {stats.feature_space!r}, "
                         f"not {feature_space!r}; pass another path or use overwrite=True")
    return stats


def compute_reference_statistics(path: str, compute_features: Callable[[], np.ndarray], *,
                                 feature_space: str, overwrite: bool = False) -> ReferenceStatistics:
    """Reference statistics cached at ``path``: loaded if present, else ``compute_features()`` is
    called (once), fitted by :func:`feature_statistics` and saved.

    ``feature_space`` names the space (e.g. ``"inception-pool3"`` or ``"pixels"``); a cache from a
    different space raises instead of being silently reused.
    """
    if os.path.exists(path) and not overwrite:
        return load_statistics(path, feature_space)
    features = np.asarray(compute_features())
    mu, sigma = feature_statistics(features)
    stats = ReferenceStatistics(mu, sigma, int(features.shape[0]), feature_space)
    save_statistics(path, stats)
    return stats


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``k(x, y) = (x.y / d + 1)^3`` for all pairs: ``(m, d), (n, d) -> (m, n)``."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (diagonal terms excluded)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("each set needs at least 2 samples")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def kid_from_features(features_a: np.ndarray, features_b: np.ndarray, *, num_subsets: int = 100,
                      subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """KID: mean and standard deviation of ``MMD^2_u`` over ``num_subsets`` random subsets.

    Each subset takes ``min(subset_size, n_a, n_b)`` rows of each set without replacement
    (the KID paper's / torch-fidelity's protocol); ``seed`` fixes the subsets.
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {a.shape} and {b.shape}")
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        xa = a[rng.choice(a.shape[0], size, replace=False)]
        xb = b[rng.choice(b.shape[0], size, replace=False)]
        values[i] = mmd2_unbiased(xa, xb)
    return float(values.mean()), float(values.std())


__all__ = ["feature_statistics", "frechet_distance", "fid_from_features", "ReferenceStatistics",
           "save_statistics", "load_statistics", "compute_reference_statistics",
           "polynomial_kernel", "mmd2_unbiased", "kid_from_features"]
