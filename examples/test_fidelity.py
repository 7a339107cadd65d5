"""A fidelity gate in a user's own test suite: three lines per test (run with ``PYTHONPATH=examples pytest``)."""

from bench.testing import assert_fidelity


def test_corrupted_gradient_eap_tracks_exact_patching_on_object_recall():
    assert_fidelity("toy-gpt2-2l", "custom_task:object_recall", "custom_method:eap_corrupted_grad",
                    n=8, edges="stratified:60", min_spearman=0.3)
