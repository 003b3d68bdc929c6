"""Named feature spaces, so every reported number says which space it was measured in.

* ``PIXELS``: flattened pixel values, ``(n, H, W, C) -> (n, H W C)``. Usable offline for small images
  (8x8 digits: 64 dimensions). Its Frechet distance is reported as ``"fd-pixels"``, its KID as
  ``"kid-pixels"``. It is *not* FID and must not be compared with FID numbers.
* :func:`inception_feature_space`: pool3 features of the FID Inception. Only with the checksum-verified
  pytorch-fid weights are the metrics called ``"FID"`` / ``"KID"``; with any other variables they are
  ``"fd-inception-pool3-unverified"`` / ``"kid-inception-pool3-unverified"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from diffusion_jax.evaluation.fid import (ReferenceStatistics, feature_statistics, frechet_distance,
                                       kid_from_features)


@dataclass(frozen=True)
class FeatureSpace:
    """A map from NHWC images to feature vectors, with the names of the metrics measured in it.

    Attributes:
      name: the space, e.g. ``"pixels"`` or ``"inception-pool3"`` (used to tag cached statistics).
      fd_name: what the Frechet distance in this space is called (``"fd-pixels"``, ``"FID"``).
      kid_name: what the KID in this space is called.
      extract: ``images (n, H, W, C) -> features (n, d)``.
    """
    name: str
    fd_name: str
    kid_name: str
    extract: Callable[[Any], np.ndarray]


def pixel_features(images: Any) -> np.ndarray:
    """Flattened pixels ``(n, H, W, C) -> (n, H W C)`` in float64 (no rescaling)."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (n, ...), got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


PIXELS = FeatureSpace(name="pixels", fd_name="fd-pixels", kid_name="kid-pixels", extract=pixel_features)


def inception_feature_space(weights_path: Optional[str] = None, *, variables: Optional[Dict[str, Any]] = None,
                            batch_size: int = 50, mesh: Any = None) -> FeatureSpace:
    """The FID Inception pool3 space.

    With ``variables=None`` the weights are loaded (checksum-verified) from ``weights_path`` or
    ``$DIFFUSION_JAX_FID_WEIGHTS`` and the metrics are named ``"FID"``/``"KID"``. Passing
    ``variables`` directly (e.g. random ones in tests) gives the ``"...-unverified"`` names.
    """
    from diffusion_jax.evaluation.inception import inception_features, load_inception_weights

    verified = variables is None
    if verified:
        variables = load_inception_weights(weights_path, verify_checksum=True)

    def extract(images: Any) -> np.ndarray:
        return inception_features(variables, images, batch_size, mesh=mesh)

    if verified:
        return FeatureSpace("inception-pool3", "FID", "KID", extract)
    return FeatureSpace("inception-pool3-unverified", "fd-inception-pool3-unverified",
                        "kid-inception-pool3-unverified", extract)


def frechet_distance_in(space: FeatureSpace, images_a: Any,
                        images_b: Union[Any, ReferenceStatistics], *, method: str = "eigh") -> Dict[str, float]:
    """``{space.fd_name: d^2}`` between the Gaussian fits of two image sets in ``space``.

    ``images_b`` may be precomputed :class:`ReferenceStatistics`, which must be in the same space.
    """
    mu_a, sigma_a = feature_statistics(space.extract(images_a))
    if isinstance(images_b, ReferenceStatistics):
        if images_b.feature_space != space.name:
            raise ValueError(f"reference statistics are in space {images_b.feature_space!r}, not {space.name!r}")
        mu_b, sigma_b = images_b.mu, images_b.sigma
    else:
        mu_b, sigma_b = feature_statistics(space.extract(images_b))
    return {space.fd_name: frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=method)}


def kid_in(space: FeatureSpace, images_a: Any, images_b: Any, *, num_subsets: int = 100,
           subset_size: int = 1000, seed: int = 0) -> Dict[str, float]:
    """``{space.kid_name: mean, space.kid_name + "-std": std}`` of KID over random subsets."""
    mean, std = kid_from_features(space.extract(images_a), space.extract(images_b),
                                  num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    return {space.kid_name: mean, space.kid_name + "-std": std}


__all__ = ["FeatureSpace", "PIXELS", "pixel_features", "inception_feature_space",
           "frechet_distance_in", "kid_in"]
