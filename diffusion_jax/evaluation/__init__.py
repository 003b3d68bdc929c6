"""Sample-quality metrics: FID with a Flax port of pytorch-fid's Inception-v3, Frechet distance, KID.

* :mod:`.inception` -- the FID Inception-v3 (Flax linen), its one-to-one weight mapping from the
  pytorch-fid checkpoint, weight loading (no downloads) and batched/sharded feature extraction.
* :mod:`.fid` -- Gaussian statistics, Frechet distance (float64, host), cached reference statistics, KID.
* :mod:`.features` -- named feature spaces (``PIXELS`` -> "fd-pixels"; Inception -> "FID" only with
  the verified weights).
* :mod:`.torch_pickle` -- an allowlist reader for ``torch.save`` checkpoints that needs no torch.
"""
from diffusion_jax.evaluation.features import (PIXELS, FeatureSpace, frechet_distance_in, inception_feature_space,
                                            kid_in, pixel_features)
from diffusion_jax.evaluation.fid import (ReferenceStatistics, StreamingStatistics, load_published_statistics, compute_reference_statistics, feature_statistics,
                                       fid_from_features, frechet_distance, kid_from_features, load_statistics,
                                       mmd2_unbiased, polynomial_kernel, save_statistics)
from diffusion_jax.evaluation.inception import (FID_WEIGHTS_ENV, FID_WEIGHTS_FILENAME, FID_WEIGHTS_URL,
                                             FIDInceptionV3, convert_weights, flax_to_torch_state_dict,
                                             inception_features, load_inception_weights, torch_state_dict_spec,
                                             torch_state_dict_to_flax)
from diffusion_jax.evaluation.torch_pickle import UnsafeCheckpointError, load_torch_checkpoint, load_torch_state_dict

__all__ = [
    "PIXELS", "FeatureSpace", "frechet_distance_in", "inception_feature_space", "kid_in", "pixel_features",
    "ReferenceStatistics", "StreamingStatistics", "load_published_statistics", "compute_reference_statistics", "feature_statistics", "fid_from_features",
    "frechet_distance", "kid_from_features", "load_statistics", "mmd2_unbiased", "polynomial_kernel",
    "save_statistics",
    "FID_WEIGHTS_ENV", "FID_WEIGHTS_FILENAME", "FID_WEIGHTS_URL", "FIDInceptionV3", "convert_weights",
    "flax_to_torch_state_dict", "inception_features", "load_inception_weights", "torch_state_dict_spec",
    "torch_state_dict_to_flax",
    "UnsafeCheckpointError", "load_torch_checkpoint", "load_torch_state_dict",
]
