"""GAE keeps terminations and truncations apart: values checked by hand."""

import numpy as np

from marl_shared.algorithms.gae import compute_gae


def _one_env(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.5):
    t = len(rewards)
    adv, targets = compute_gae(
        rewards=np.asarray(rewards, np.float32).reshape(t, 1),
        values=np.asarray(values, np.float32).reshape(t, 1, 1),
        next_values=np.asarray(next_values, np.float32).reshape(t, 1, 1),
        terminated=np.asarray(terminated, bool).reshape(t, 1),
        truncated=np.asarray(truncated, bool).reshape(t, 1),
        gamma=gamma,
        lam=lam,
    )
    return adv[:, 0, 0], targets[:, 0, 0]


def test_termination_bootstraps_nothing_and_stops_the_recursion():
    # step 0: r=1, V=0.5, next V=2 -> delta0 = 1 + 0.9*2 - 0.5 = 2.3
    # step 1: terminal, r=1, V=1 -> delta1 = 1 - 1 = 0 ; adv1 = 0
    # adv0 = 2.3 + 0.45 * 0 = 2.3
    adv, targets = _one_env([1, 1], [0.5, 1.0], [2.0, 7.0], [0, 1], [0, 0])
    np.testing.assert_allclose(adv, [2.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(targets, [2.8, 1.0], rtol=1e-6)


def test_truncation_bootstraps_from_the_final_state_value():
    # step 1 truncated with final-state value 3: delta1 = 1 + 0.9*3 - 1 = 2.7
    adv, _ = _one_env([1, 1], [0.5, 1.0], [2.0, 3.0], [0, 0], [0, 1])
    np.testing.assert_allclose(adv[1], 2.7, rtol=1e-6)
    np.testing.assert_allclose(adv[0], 2.3 + 0.45 * 2.7, rtol=1e-6)


def test_an_episode_end_does_not_leak_advantage_into_the_previous_episode():
    # step 0 ends an episode (truncated); step 1 belongs to the next one.
    adv, _ = _one_env([0, 5], [0, 0], [1.0, 0.0], [0, 0], [1, 0])
    np.testing.assert_allclose(adv[0], 0.9 * 1.0, rtol=1e-6)  # no 0.45 * adv[1] term
    np.testing.assert_allclose(adv[1], 5.0, rtol=1e-6)
