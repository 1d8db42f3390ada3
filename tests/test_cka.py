"""Linear CKA against known cases, and the backbone analysis on a real module."""

from __future__ import annotations

import numpy as np
import pytest

from marl_shared.analysis.representations import linear_cka, pca_2d, shared_unit_similarity


def random_orthogonal(n: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def test_identical_representations_have_cka_one():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transform_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 12))
    y = x @ rng.normal(size=(12, 8)) + 0.5 * rng.normal(size=(300, 8))
    base = linear_cka(x, y)
    assert 0.2 < base < 0.95  # a real, partial similarity
    q = random_orthogonal(12, rng)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x @ q * 5.0, y) == pytest.approx(base, abs=1e-10)
    # Orthogonal transform of x is still CKA 1 against x itself.
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)


def test_cka_of_independent_representations_is_near_zero_and_not_invariant_to_anisotropic():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 4))
    y = rng.normal(size=(5000, 4))
    assert linear_cka(x, y) < 0.01
    z = x @ rng.normal(size=(4, 4))
    stretched = x * np.array([10.0, 1.0, 1.0, 1.0])
    assert linear_cka(x, z) != pytest.approx(linear_cka(stretched, z), abs=1e-3)


def test_cka_matches_the_gram_matrix_definition():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 3))
    h = np.eye(50) - 1.0 / 50
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    expected = np.sum(kx * ky) / (np.linalg.norm(kx) * np.linalg.norm(ky))
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-12)


def test_unit_similarity_is_one_for_same_unit_statistics_and_low_for_disjoint_units():
    rng = np.random.default_rng(4)
    mixing = rng.normal(size=(8, 8))
    a = rng.normal(size=(4000, 8)) @ mixing
    b = rng.normal(size=(3000, 8)) @ mixing  # other samples, same unit covariance
    assert shared_unit_similarity(a, b) > 0.98
    assert shared_unit_similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    left = np.concatenate([rng.normal(size=(2000, 4)), np.zeros((2000, 4))], axis=1)
    right = np.concatenate([np.zeros((2000, 4)), rng.normal(size=(2000, 4))], axis=1)
    assert shared_unit_similarity(left, right) < 0.01


def test_pca_puts_the_largest_variance_first():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 3)) * np.array([10.0, 3.0, 0.1])
    embedded = pca_2d(x)
    assert embedded.shape == (1000, 2)
    assert np.var(embedded[:, 0]) == pytest.approx(100.0, rel=0.15)
    assert np.var(embedded[:, 1]) == pytest.approx(9.0, rel=0.15)


def test_backbone_activations_follow_the_chosen_candidate_and_alive_agents():
    import torch
    from test_continual import _tiny_module

    from marl_shared.analysis.representations import backbone_activations
    from marl_shared.models import columns as C

    multi = _tiny_module()
    module = multi["smax__x"]
    rng = np.random.default_rng(0)
    rows = {
        C.OBS: rng.normal(size=(5, 2, 3)).astype(np.float32),
        C.PREV_ACTIONS: rng.integers(-1, 4, size=(5, 2)),
        C.ACTIONS: rng.integers(0, 4, size=(5, 2)),
        C.ACTIVE: np.array([[True, False]] * 5),
    }
    layers = backbone_activations(module, rows)
    assert list(layers) == ["perception", "backbone.0"]
    assert layers["backbone.0"].shape == (5, 8)  # only the alive agent of each row
    with torch.no_grad():
        features = module.perception.step(
            torch.from_numpy(rows[C.OBS]), torch.from_numpy(rows[C.PREV_ACTIONS]), None
        )
        chosen = features[torch.arange(5), 0, torch.from_numpy(rows[C.ACTIONS][:, 0])]
        expected = torch.relu(module.backbone.layers[0](chosen)).numpy()
    assert np.allclose(layers["backbone.0"], expected, atol=1e-6)
