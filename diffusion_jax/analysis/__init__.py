"""Analyses of sampling dynamics for every linear family (arXiv 2305.19947, docs/maths.md section 6).

Modal families (blurring diffusion) are supported by the trajectory geometry and the score deviation; the
mean-shift view needs one scalar law for every data dimension and rejects them (:mod:`.meanshift`).

* :mod:`.geometry`: sampling / denoising trajectories from sampler output and their geometry (chord
  deviation, distance to the end point, step angles, curvature);
* :mod:`.meanshift`: Gaussian mean shift, KDE log-density, annealed mean shift, and the identity between
  an Euler step of the VE ODE with the optimal denoiser and a mean-shift step;
* :mod:`.deviation`: learned versus optimal (empirical) denoiser from the same noise, and nearest-neighbour
  (memorisation) distances;
* :mod:`.plots`: PNG figures (matplotlib Agg canvas).
"""
from diffusion_jax.analysis.deviation import denoiser_along, empirical_denoiser_fn, nearest_neighbors, score_deviation
from diffusion_jax.analysis.geometry import (chord_deviation, denoising_trajectory, distance_to_end, edm_view,
                                             flatten_trajectory, menger_curvature, reference_mean_coefficient,
                                             sampling_trajectory, second_derivative_norm, step_cosines,
                                             trajectory_geometry, turning_angles)
from diffusion_jax.analysis.meanshift import (annealed_mean_shift, check_scalar_law, euler_mean_shift_identity,
                                              gaussian_kde_logpdf, kernel_weighted_mean, mean_shift_step)
from diffusion_jax.analysis.plots import plot_curves, plot_score_deviation, plot_trajectories_1d, plot_trajectories_2d

__all__ = [
    "sampling_trajectory", "denoising_trajectory", "edm_view", "reference_mean_coefficient", "flatten_trajectory",
    "chord_deviation", "distance_to_end", "step_cosines", "turning_angles", "menger_curvature",
    "second_derivative_norm", "trajectory_geometry", "kernel_weighted_mean", "mean_shift_step",
    "gaussian_kde_logpdf", "annealed_mean_shift", "euler_mean_shift_identity", "check_scalar_law",
    "empirical_denoiser_fn", "denoiser_along", "score_deviation", "nearest_neighbors", "plot_trajectories_2d",
    "plot_trajectories_1d", "plot_curves", "plot_score_deviation",
]
