"""Test-session set-up: CPU platform, the tests folder on sys.path, and the xdist order.

Under ``pytest -n N`` (``make test``) the suite's wall time on 2 workers is bounded below by its longest test
plus whatever runs after it on the same worker. Each worker therefore orders the collection longest first
(measured seconds in ``SECONDS`` below; a test missing from the table counts as short), so xdist's default
``load`` scheduler hands out the long tests at once and the short ones fill the gaps at the end. The order does
not change what any test does; a run without xdist keeps the file order. (A custom scope scheduler that kept
the tests sharing a module fixture on one worker was tried and removed: after a crashed worker it stalled
the run instead of replacing the worker.)
"""
import os
import sys

import pytest

# Tests run on the CPU; several tests fake multiple host devices themselves in subprocesses.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# Seconds per test (per parametrised instance), measured with --durations on 2 loaded cores (call + setup);
# only the order matters. Keys: "file::test" for every instance, or "file::test[id]" for one instance.
SECONDS = {
    "test_multihost.py::test_two_processes_equal_one_and_survive_kill_and_preemption": 400,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32": 60,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cdhold4]": 350,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[cld]": 116,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[vp]": 99,
    "test_solver_accuracy.py::test_every_order_is_exact_on_a_single_point_in_float32[told]": 95,
    "test_solver_accuracy.py::test_convergence_order_windows": 50,
    "test_samplers.py::test_convergence_orders_on_exact_mixture_scores": 260,
    "test_samplers.py::test_gddim_with_R_is_exact_on_a_single_point_and_L_is_not": 40,
    "test_samplers.py::test_gddim_with_R_is_exact_on_a_single_point_and_L_is_not[cdhold4]": 144,
    "test_samplers.py::test_diffrax_nfe_formula_matches_counted_evaluations": 83,
    "test_interop.py::test_imported_run_samples_and_bpd": 227,
    "test_interop.py::test_imported_score_equals_reference_score_function": 68,
    "test_bench_nfe.py::test_bench_nfe_cells_nfe_noise_and_resume": 200,
    "test_bench_nfe.py::test_bpd_of_tiny_run": 64,
    "test_bench_nfe.py::test_bench_nfe_compiles_once_per_cell_over_three_batches": 37,
    "test_bdm.py::test_tiny_digits_bdm_run_trains_samples_and_benchmarks": 136,
    "test_notebooks.py::test_notebook_runs_from_notebooks_dir": 70,
    "test_notebooks.py::test_notebook_runs_from_notebooks_dir[03_nfe_vs_quality]": 93,
    "test_notebooks.py::test_setup_cell_runs_from_repo_root": 20,
    "test_likelihood.py::test_full_state_exact_trace_matches_closed_form": 42,
    "test_likelihood.py::test_k1_exact_trace_matches_closed_form": 24,
    "test_likelihood.py::test_hutchinson_mean_matches_exact_trace": 47,
    "test_training.py::test_toy_training_learns_the_ring": 60,
    "test_training.py::test_same_result_on_8_devices_and_on_1": 112,
    "test_training.py::test_sigterm_saves_at_the_next_step_and_resumes_exactly": 91,
    "test_training.py::test_bfloat16_compute_and_periodic_samples": 72,
    "test_training.py::test_unreadable_newest_checkpoint_falls_back_and_deletes_nothing": 69,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps": 68,
    "test_training.py::test_nan_stops_and_keeps_last_good_checkpoint": 43,
    "test_training.py::test_periodic_sampling_compiles_once": 42,
    "test_training.py::test_load_run_uses_the_config_in_the_checkpoint": 38,
    "test_field_family.py::test_field_model_trains_through_the_training_loop": 89,
    "test_ncsnpp.py::test_bfloat16_compute_stays_close": 70,
    "test_models.py::test_ddpmpp_jit_shape_and_determinism": 67,
    "test_models.py::test_ddpmpp_bf16": 29,
    "test_report.py::test_report_on_a_tiny_bdm_run": 61,
    "test_report.py::test_optimal_denoiser_plus_constant": 52,
    "test_report.py::test_report_on_trained_toy_run": 48,
    "test_report.py::test_analyze_bdm_images_with_optimal_denoiser_plus_constant": 35,
    "test_exact.py::test_bdm_empirical_denoiser_and_score_match_float64_softmax": 30,
    "test_exact.py::test_finite_at_t_min": 28,
    "test_exact.py::test_empirical_chunking_and_vmap_over_time": 28,
    "test_metrics.py::test_flax_port_matches_numpy_reference_through_pth_loader": 49,
    "test_metrics.py::test_sharded_features_and_grayscale_in_subprocess": 34,
    "test_fields.py::test_large_d_sampler_matches_ve_edm": 36,
    "test_subvp.py::test_subvp_learns_the_ring": 35,
    "test_losses.py::test_optimal_eps_attains_closed_form_minimum": 30,
    "test_marginal_sampling.py::test_per_example_times_broadcast_over_data_axes": 25,
    "test_compile_once.py::test_sharded_sampling_equals_unsharded": 38,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps_for_the_unets[ncsnpp]": 82,
    "test_training.py::test_n_steps_per_call_is_bitwise_equal_to_single_steps_for_the_unets[ddpmpp]": 51,
    "test_interop_gddim.py::test_import_then_bench_nfe_and_bpd": 70,
    "test_interop_gddim.py::test_forward_and_score_match_gddim_reference": 24,
    "test_interop_peers.py::test_imported_run_samples_and_bpd": 50,
    "test_interop_peers.py::test_output_and_score_parity_with_the_reference": 28,
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
