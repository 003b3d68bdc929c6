"""Distances between point clouds in data space (no network): sliced Wasserstein, and a Gaussian-fit baseline.

The sliced 2-Wasserstein distance averages, over random unit directions theta, the exact 1-D optimal transport
cost between the projections theta^T a and theta^T b (sorted samples): SW_2^2 = E_theta W_2^2(theta#a, theta#b).
"""
from __future__ import annotations

import numpy as np

def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size point clouds (exact 1-D OT per projection)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_proj, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))

def gaussian_fit_samples(data: np.ndarray, n: int, seed: int = 2) -> np.ndarray:
    """n samples of N(mean(data), cov(data))."""
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(data.mean(0), np.cov(data.T), size=n)
