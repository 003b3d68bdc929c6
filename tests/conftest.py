"""Test-session set-up: CPU platform, the tests folder on sys.path, and the xdist order.

Under ``pytest -n N`` (``make test``) the suite's wall time on 2 workers is bounded below by its longest test
plus whatever runs after it on the same worker. Each worker therefore orders the collection longest first
(measured seconds in ``SECONDS`` below; a test missing from the table counts as short), and the controller hands
tests out one at a time (``--maxschedchunk 1`` unless given): xdist's ``load`` scheduler would otherwise send each
worker a first chunk of a quarter of its share, consecutive in that order, so one worker would get all of the
longest tests (measured: a 5-minute tail on one worker). The order does
not change what any test does; a run without xdist keeps the file order. (A custom scope scheduler that kept
the tests sharing a module fixture on one worker was tried and removed: after a crashed worker it stalled
the run instead of replacing the worker.)
"""
import os
import shutil
import sys
import tempfile

import pytest

# Tests run on the CPU; several tests fake multiple host devices themselves in subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))     # the golden-fixture scripts

# One XLA compilation cache for the whole test session: the xdist workers and the training / benchmark
# processes the tests start compile many identical programs (the same toy configs, samplers and U-Net steps),
# so each is compiled once per session instead of once per process. Set up by the controller (its environment
# reaches the workers and their subprocesses); an explicit JAX_COMPILATION_CACHE_DIR is left alone. Compile
# counting is unaffected: jax logs "Finished XLA compilation" for a cache hit too (CompileLog).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="diffusion_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The suite is compile-bound (small programs, run a few times each), so the session's XLA CPU backend skips
# LLVM's optimisation passes: measured on the U-Net scan-equality and imported-run tests, 110 s -> 79 s. The
# programs are the same HLO (compile counts and HLO sizes are unaffected) and no level enables fast-math;
# results can differ from the default level only in the last bits, where LLVM contracts multiply-adds, and
# no test compares values across levels. Set XLA_FLAGS with an explicit --xla_backend_optimization_level to
# test another. The processes the tests start keep these flags (tests/xla_env.py); `make demo` and the
# benchmarks use XLA's default.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Seconds per test (per parametrised instance, call + setup, >= 4 s), from `pytest -n 2 --durations=0` on 2 idle
# cores; only the order matters. Keys: "file::test" for every instance, or "file::test[id]" for one instance.
SECONDS = {
    "test_multihost.py::test_two_processes_equal_one_and_survive_kill_and_preemption": 155,
    "test_interop_peers.py::test_imported_run_samples_and_bpd[cld_sgm]": 37,
    "test_notebooks.py::test_notebook_runs_from_notebooks_dir[03_nfe_vs_quality]": 37,
    "test_bench_nfe.py::test_bench_nfe_cells_nfe_noise_and_resume": 36,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps_for_the_unets[ncsnpp]": 36,
    "test_samplers.py::test_convergence_orders_on_exact_mixture_scores": 32,
    "test_interop_peers.py::test_imported_run_samples_and_bpd[psld]": 32,
    "test_bdm.py::test_tiny_digits_bdm_run_trains_samples_and_benchmarks": 30,
    "test_interop.py::test_imported_run_samples_and_bpd": 26,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps_for_the_unets[ddpmpp]": 23,
    "test_field_family.py::test_field_model_trains_through_the_training_loop": 21,
    "test_training.py::test_same_result_on_8_devices_and_on_1": 19,
    "test_notebooks.py::test_notebook_runs_from_notebooks_dir[02_trajectory_geometry]": 19,
    "test_learned_robust.py::test_tuner_validation_keeps_the_better_entry": 18,
    "test_interop_gddim.py::test_import_then_bench_nfe_and_bpd": 18,
    "test_report.py::test_report_on_trained_toy_run": 17,
    "test_samplers.py::test_diffrax_nfe_formula_matches_counted_evaluations": 15,
    "test_training.py::test_toy_training_learns_the_ring[toy2d_cld.py]": 14,
    "test_bench_nfe.py::test_bpd_of_tiny_run": 14,
    "test_interop_peers.py::test_cld_sgm_position_part_implies_the_same_denoiser": 14,
    "test_bench_nfe.py::test_bench_nfe_compiles_once_per_cell_over_three_batches": 13,
    "test_models.py::test_ddpmpp_bf16": 12,
    "test_solver_accuracy.py::test_higher_order_is_more_accurate_at_fixed_nfe": 12,
    "test_training.py::test_sigterm_saves_at_the_next_step_and_resumes_exactly": 12,
    "test_training.py::test_toy_training_learns_the_ring[toy2d_vp.py]": 12,
    "test_compile_once.py::test_sharded_sampling_equals_unsharded": 12,
    "test_report.py::test_report_on_a_tiny_bdm_run": 11,
    "test_training.py::test_bfloat16_compute_and_periodic_samples": 11,
    "test_report.py::test_optimal_denoiser_plus_constant[0.0]": 10,
    "test_ncsnpp.py::test_bfloat16_compute_stays_close": 10,
    "test_metrics.py::test_sharded_features_and_grayscale_in_subprocess": 9,
    "test_notebooks.py::test_notebook_runs_from_notebooks_dir[01_family_zoo]": 9,
    "test_interop.py::test_imported_score_equals_reference_score_function": 8,
    "test_learned_robust.py::test_tuner_measures_candidates_under_the_bound": 8,
    "test_solver_accuracy.py::test_single_step_convergence_order": 8,
    "test_learned_robust.py::test_single_step_tuner_stores_what_the_plan_runs": 7,
    "test_likelihood.py::test_hutchinson_mean_matches_exact_trace": 8,
    "test_solver_accuracy.py::test_convergence_order_windows[q3c-1]": 7,
    "test_interop_peers.py::test_output_and_score_parity_with_the_reference[psld]": 7,
    "test_bench_nfe.py::test_bpd_is_exact_for_the_gaussian_reference_model": 7,
    "test_interop_peers.py::test_output_and_score_parity_with_the_reference[cld_sgm]": 7,
    "test_metrics.py::test_flax_port_matches_numpy_reference_through_pth_loader": 7,
    "test_likelihood.py::test_full_state_exact_trace_matches_closed_form[cdhold]": 7,
    "test_subvp.py::test_subvp_learns_the_ring": 7,
    "test_models.py::test_ddpmpp_dropout_active_in_training": 7,
    "test_training.py::test_periodic_sampling_compiles_once": 7,
    "test_likelihood.py::test_full_state_exact_trace_matches_closed_form[psld]": 7,
    "test_training.py::test_unreadable_newest_checkpoint_falls_back_and_deletes_nothing": 6,
    "test_interop_gddim.py::test_forward_and_score_match_gddim_reference[released]": 6,
    "test_bdm.py::test_loss_at_the_gaussian_optimum[eps]": 6,
    "test_exact.py::test_empirical_chunking_and_vmap_over_time": 6,
    "test_marginal_sampling.py::test_per_example_times_broadcast_over_data_axes": 6,
    "test_report.py::test_analyze_bdm_images_with_optimal_denoiser_plus_constant": 6,
    "test_likelihood.py::test_auxiliary_bound[cld]": 6,
    "test_analysis.py::test_score_deviation_with_a_known_denoiser_offset": 6,
    "test_training.py::test_nan_stops_and_keeps_last_good_checkpoint": 6,
    "test_likelihood.py::test_auxiliary_bound[cdhold]": 6,
    "test_fields.py::test_large_d_sampler_matches_ve_edm": 6,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[told]": 6,
    "test_analysis.py::test_pf_ode_with_optimal_denoiser_converges_to_training_points[cld-0.001]": 6,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cdhold5]": 6,
    "test_exact.py::test_empirical_denoiser_matches_bruteforce_and_dirac_mixture[cld]": 6,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps": 5,
    "test_losses.py::test_optimal_eps_attains_closed_form_minimum[likelihood-cld-params3-hsm-L]": 5,
    "test_analysis.py::test_bdm_score_deviation_of_the_exact_optimal_denoiser_is_zero": 5,
    "test_exact.py::test_finite_at_t_min[cdhold6]": 5,
    "test_likelihood.py::test_auxiliary_bound[psld]": 5,
    "test_bdm.py::test_gddim_is_exact_on_a_single_point": 5,
    "test_interop_peers.py::test_cld_sgm_velocity_score_formula_with_its_numerical_eps[1e-09]": 5,
    "test_analysis.py::test_pf_ode_with_optimal_denoiser_converges_to_training_points[ve-None]": 5,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cdhold4]": 5,
    "test_training.py::test_load_run_uses_the_config_in_the_checkpoint": 5,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cdhold6]": 5,
    "test_field_family.py::test_training_loss_draws_the_kernel_noise": 5,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cld]": 4,
    "test_analysis.py::test_pf_ode_with_optimal_denoiser_converges_to_training_points[vp-None]": 4,
    "test_samplers.py::test_gddim_with_R_is_exact_on_a_single_point_and_L_is_not[cld]": 4,
    "test_compile_once.py::test_typed_keys_work_for_every_method[tsit5]": 4,
    "test_bdm.py::test_scaled_residual_is_the_reference_posterior_std": 4,
    "test_samplers.py::test_gddim_with_R_is_exact_on_a_single_point_and_L_is_not[cdhold4]": 4,
}
SHORT = 1.0


def _seconds(item) -> float:
    key = f"{os.path.basename(str(item.path))}::{item.name}"
    base = key.split("[", 1)[0]
    return SECONDS.get(key, SECONDS.get(base, SHORT))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    if not hasattr(config, "workerinput"):          # not an xdist worker: keep the file order
        return
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-_seconds(item), position[id(item)]))


def pytest_configure(config):
    # One test at a time from the longest-first queue (greedy longest-processing-time scheduling); see above.
    if getattr(config.option, "maxschedchunk", 1) is None:
        config.option.maxschedchunk = 1


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)      # the session's own temporary cache
