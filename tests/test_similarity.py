"""Tests for ddppo.analysis.similarity (CCA, PWCCA, linear CKA)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from ddppo.analysis.similarity import (
    CCAResult,
    InsufficientDatapointsWarning,
    cca,
    check_datapoints,
    conv_activations_to_2d,
    linear_cka,
    linear_cka_debiased,
    mean_cca,
    pwcca,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _well_conditioned(rng: np.random.Generator, n: int, lo: float = 0.5, hi: float = 3.0) -> np.ndarray:
    """Random invertible matrix with singular values in [lo, hi]."""
    q1, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q1 @ np.diag(np.linspace(lo, hi, n)) @ q2


def _orthonormal_centred_columns(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``[n, k]`` matrix with orthonormal columns that are each orthogonal to the all-ones vector."""
    g = rng.standard_normal((n, k))
    g -= g.mean(axis=0)
    q, _ = np.linalg.qr(g)
    return q


# --------------------------------------------------------------------------------------------------- identity


def test_identical_inputs_give_one() -> None:
    x = _rng(1).standard_normal((12, 600))
    res = cca(x, x)
    assert isinstance(res, CCAResult)
    assert res.num_pairs == 12
    np.testing.assert_allclose(res.rho, 1.0, atol=1e-5)
    assert pwcca(x, x) == pytest.approx(1.0, abs=1e-5)
    assert pwcca(x, x, symmetric=True) == pytest.approx(1.0, abs=1e-5)
    assert mean_cca(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka_debiased(x, x) == pytest.approx(1.0, abs=1e-12)


def test_result_structure() -> None:
    rng = _rng(2)
    x = rng.standard_normal((6, 400)) + 5.0
    y = rng.standard_normal((4, 400)) - 2.0
    res = cca(x, y, epsilon=0.0)
    k = 4
    assert res.rho.shape == (k,)
    assert np.all(np.diff(res.rho) <= 0), "correlations must be sorted descending"
    assert np.all((res.rho >= 0) & (res.rho <= 1))
    assert res.x_variates.shape == (k, 400) and res.y_variates.shape == (k, 400)
    assert res.x_coefs.shape == (k, 6) and res.y_coefs.shape == (k, 4)
    # Variates: zero mean, unit variance, uncorrelated within a side; pair i correlates with rho_i.
    np.testing.assert_allclose(res.x_variates.mean(axis=1), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(res.x_variates), np.eye(k), atol=1e-10)
    np.testing.assert_allclose(np.cov(res.y_variates), np.eye(k), atol=1e-10)
    cross = res.x_variates @ res.y_variates.T / (400 - 1)
    np.testing.assert_allclose(cross, np.diag(res.rho), atol=1e-10)
    # Coefficients reproduce the variates from raw activations.
    np.testing.assert_allclose(res.x_coefs @ (x - res.x_mean[:, None]), res.x_variates, atol=1e-10)
    np.testing.assert_allclose(res.y_coefs @ (y - res.y_mean[:, None]), res.y_variates, atol=1e-10)
    assert res.x_weights.sum() == pytest.approx(1.0) and res.y_weights.sum() == pytest.approx(1.0)


def test_rho_matches_principal_angles() -> None:
    """Canonical correlations are the cosines of the principal angles between the centred row spaces."""
    rng = _rng(3)
    x = rng.standard_normal((7, 300))
    y = 0.6 * rng.standard_normal((5, 7)) @ x + rng.standard_normal((5, 300))
    xc = (x - x.mean(axis=1, keepdims=True)).T
    yc = (y - y.mean(axis=1, keepdims=True)).T
    expected = np.sort(np.cos(scipy.linalg.subspace_angles(xc, yc)))[::-1]
    np.testing.assert_allclose(cca(x, y, epsilon=0.0).rho, expected, atol=1e-10)
    np.testing.assert_allclose(cca(x, y).rho, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------- hand-worked


def test_single_neuron_equals_abs_pearson_by_hand() -> None:
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    y = np.array([[2.0, 4.0, 6.0, 8.5]])
    # By hand: deviations dx = [-1.5, -0.5, 0.5, 1.5], dy = [-3.125, -1.125, 0.875, 3.375];
    # sum dx*dy = 10.75, sum dx^2 = 5, sum dy^2 = 23.1875.
    r = 10.75 / np.sqrt(5.0 * 23.1875)
    assert r == pytest.approx(0.998381, abs=1e-6)
    with pytest.warns(InsufficientDatapointsWarning):  # 4 datapoints for 1 neuron is below the 5x rule
        res = cca(x, y, epsilon=0.0)
    assert res.rho[0] == pytest.approx(r, abs=1e-12)
    # A negative relationship has the same canonical correlation.
    assert cca(x, -y, epsilon=0.0, min_ratio=None).rho[0] == pytest.approx(r, abs=1e-12)
    # The ridge shrinks it by 1 / (1 + epsilon) for one standardised neuron per side.
    assert cca(x, y, epsilon=1e-6, min_ratio=None).rho[0] == pytest.approx(r / (1 + 1e-6), abs=1e-12)
    # One pair: every weighted mean is the correlation itself.
    assert pwcca(x, y, min_ratio=None, epsilon=0.0) == pytest.approx(r, abs=1e-12)
    assert mean_cca(x, y, min_ratio=None, epsilon=0.0) == pytest.approx(r, abs=1e-12)


def test_two_neurons_one_shared_one_independent_pair() -> None:
    rng = _rng(4)
    n = 4000
    shared, only_x, only_y = rng.standard_normal((3, n))
    x = np.array([[2.0, 1.0], [0.5, -1.0]]) @ np.stack([shared, only_x])
    y = np.array([[1.0, 3.0], [-1.0, 0.2]]) @ np.stack([shared, only_y])
    res = cca(x, y)
    assert res.rho[0] == pytest.approx(1.0, abs=1e-5)
    assert res.rho[1] < 4.0 / np.sqrt(n)  # sampling noise of an independent pair is ~ 1/sqrt(n)
    # The first canonical variate of each side is the shared signal (up to sign).
    assert abs(np.corrcoef(res.x_variates[0], shared)[0, 1]) == pytest.approx(1.0, abs=1e-5)
    assert abs(np.corrcoef(res.y_variates[0], shared)[0, 1]) == pytest.approx(1.0, abs=1e-5)
    assert mean_cca(x, y) == pytest.approx(0.5 * (1.0 + res.rho[1]))


def test_pwcca_weights_by_share_of_activity() -> None:
    """When the shared direction dominates x's activity, PWCCA(x, y) is close to 1 while mean CCA is ~0.5."""
    rng = _rng(5)
    n = 3000
    shared, only_x, only_y = rng.standard_normal((3, n))
    x = np.stack([10.0 * shared, 0.1 * only_x])
    y = np.stack([shared, only_y])
    res = cca(x, y)
    assert res.x_weights[0] > 0.98
    assert mean_cca(x, y) < 0.55
    assert pwcca(x, y) > 0.98
    # y's activity is split evenly between the shared and the private direction.
    assert pwcca(y, x) == pytest.approx(0.5 * (1.0 + res.rho[1]), abs=0.05)


# ------------------------------------------------------------------------------------------- invariances


def test_cca_pwcca_invariant_to_invertible_map() -> None:
    rng = _rng(6)
    n = 2000
    x = rng.standard_normal((10, n))
    z = 0.5 * rng.standard_normal((8, 10)) @ x + rng.standard_normal((8, n))
    a = _well_conditioned(rng, 10)
    ax = a @ x
    # y = A x carries exactly the information of x.
    np.testing.assert_allclose(cca(x, ax).rho, 1.0, atol=1e-5)
    assert mean_cca(x, ax) == pytest.approx(1.0, abs=1e-5)
    assert pwcca(x, ax) == pytest.approx(1.0, abs=1e-5)
    assert pwcca(ax, x) == pytest.approx(1.0, abs=1e-5)
    # Relative to a third representation, the correlations do not change under an invertible map of x.
    # Exactly so without the ridge; the ridge acts on x's correlation matrix, so it perturbs this slightly.
    for eps, tol in ((0.0, 1e-9), (1e-6, 1e-5)):
        np.testing.assert_allclose(cca(x, z, eps).rho, cca(ax, z, eps).rho, atol=tol)
        assert mean_cca(x, z, eps) == pytest.approx(mean_cca(ax, z, eps), abs=tol)
        assert mean_cca(z, x, eps) == pytest.approx(mean_cca(z, ax, eps), abs=tol)
        # PWCCA weighted by z's activity is unchanged too: z's canonical directions ignore x's basis.
        assert pwcca(z, x, eps) == pytest.approx(pwcca(z, ax, eps), abs=tol)


def test_cka_invariant_to_orthogonal_and_isotropic_scaling_but_not_general_maps() -> None:
    rng = _rng(7)
    n = 1000
    x = rng.standard_normal((10, n)) * np.linspace(0.2, 3.0, 10)[:, None]
    y = 0.7 * rng.standard_normal((8, 10)) @ x + rng.standard_normal((8, n))
    base = linear_cka(x, y)
    q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    assert linear_cka(q @ x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(0.01 * q @ x, y) == pytest.approx(base, abs=1e-10)
    # An anisotropic invertible map changes it clearly (CCA would not notice).
    a = np.diag(np.geomspace(0.05, 20.0, 10)) @ q
    changed = linear_cka(a @ x, y)
    assert abs(changed - base) > 0.05
    assert mean_cca(a @ x, y) == pytest.approx(mean_cca(x, y), abs=1e-6)


# ------------------------------------------------------------------------------------------ datapoints


def test_independent_similarity_falls_with_more_datapoints() -> None:
    rng = _rng(8)
    scores = []
    cka_scores = []
    for n in (100, 2000, 10000):
        x = rng.standard_normal((50, n))
        y = rng.standard_normal((50, n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsufficientDatapointsWarning)
            scores.append(mean_cca(x, y))
        cka_scores.append(linear_cka(x, y))
    assert scores[0] > scores[1] > scores[2]
    assert scores[0] > 0.5 and scores[2] < 0.1
    assert cka_scores[0] > cka_scores[1] > cka_scores[2]


def test_too_few_datapoints_saturate_cca() -> None:
    """p + q >= datapoints: random representations look perfectly correlated in p + q - n + 1 directions."""
    rng = _rng(9)
    x = rng.standard_normal((30, 50))
    y = rng.standard_normal((30, 50))
    with pytest.warns(InsufficientDatapointsWarning):
        rho = cca(x, y, epsilon=0.0).rho
    assert np.sum(rho > 1 - 1e-8) == 30 + 30 - 50 + 1


def test_debiased_cka_removes_small_sample_bias() -> None:
    rng = _rng(10)
    x = rng.standard_normal((20, 60))
    y = rng.standard_normal((20, 60))
    assert linear_cka(x, y) > 0.2
    assert abs(linear_cka_debiased(x, y)) < 0.1
    big_x = rng.standard_normal((10, 20000))
    big_y = 0.5 * rng.standard_normal((10, 10)) @ big_x + rng.standard_normal((10, 20000))
    assert linear_cka_debiased(big_x, big_y) == pytest.approx(linear_cka(big_x, big_y), abs=2e-3)


def test_debiased_cka_matches_explicit_gram_formula() -> None:
    rng = _rng(11)
    n = 15
    x = rng.standard_normal((4, n))
    y = rng.standard_normal((6, n)) + x[:1]

    def hsic_u(k: np.ndarray, l_: np.ndarray) -> float:
        k = k - np.diag(np.diag(k))
        l_ = l_ - np.diag(np.diag(l_))
        one = np.ones(n)
        return float(
            (
                np.trace(k @ l_)
                + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ k @ l_ @ one)
            )
            / (n * (n - 3))
        )

    xd = (x - x.mean(axis=1, keepdims=True)).T
    yd = (y - y.mean(axis=1, keepdims=True)).T
    kx, ly = xd @ xd.T, yd @ yd.T
    expected = hsic_u(kx, ly) / np.sqrt(hsic_u(kx, kx) * hsic_u(ly, ly))
    assert linear_cka_debiased(x, y) == pytest.approx(expected, rel=1e-10)
    # Plain CKA agrees with its Gram-matrix form (here fewer datapoints than y's neurons is not the case,
    # so also check the Gram path with a wide input).
    assert linear_cka(x, y) == pytest.approx(np.sum(kx * ly) / (np.linalg.norm(kx) * np.linalg.norm(ly)))
    wide = rng.standard_normal((40, n))
    wd = (wide - wide.mean(axis=1, keepdims=True)).T
    kw = wd @ wd.T
    assert linear_cka(wide, x) == pytest.approx(np.sum(kw * kx) / (np.linalg.norm(kw) * np.linalg.norm(kx)))


# --------------------------------------------------------------------------------------- argument order


def test_pwcca_first_argument_with_more_neurons() -> None:
    """y = first 5 of x's 20 neurons: all 5 canonical correlations are 1, so PWCCA is 1 in both orders.

    (google/svcca's compute_pwcca raises or mis-weights here because it applies y's coefficients to x.)
    """
    x = _rng(12).standard_normal((20, 2000))
    y = x[:5].copy()
    res = cca(x, y)
    assert res.num_pairs == 5
    np.testing.assert_allclose(res.rho, 1.0, atol=1e-5)
    assert pwcca(x, y) == pytest.approx(1.0, abs=1e-5)
    assert pwcca(y, x) == pytest.approx(1.0, abs=1e-5)
    assert pwcca(x, y, symmetric=True) == pytest.approx(1.0, abs=1e-5)


def test_pwcca_argument_order_exact_weights() -> None:
    """Exactly constructed case where both orders give different, known values.

    With orthonormal centred signals z_0..z_24: x_j = s_j z_j (20 neurons), and for j < 5
    y_j = t_j (c_j z_j + sqrt(1 - c_j^2) z_{20+j}) (5 neurons). The canonical pairs are (z_j, y_j / t_j) with
    correlation c_j. x's activity along z_j is s_j (neurons 5..19 are orthogonal to every canonical
    direction), so PWCCA(x, y) = sum s_j c_j / sum s_j; y's is t_j, so PWCCA(y, x) = sum t_j c_j / sum t_j.
    """
    rng = _rng(13)
    n = 500
    z = _orthonormal_centred_columns(rng, n, 25).T * np.sqrt(n - 1)  # unit variance rows
    c = np.array([0.95, 0.8, 0.6, 0.4, 0.2])
    s = np.concatenate([[5.0, 1.0, 0.5, 3.0, 0.2], np.full(15, 2.0)])
    t = np.array([0.3, 1.0, 4.0, 0.5, 2.0])
    x = s[:, None] * z[:20] + 7.0  # a common offset must not matter
    y = t[:, None] * (c[:, None] * z[:5] + np.sqrt(1 - c[:, None] ** 2) * z[20:25])
    res = cca(x, y, epsilon=0.0)
    np.testing.assert_allclose(res.rho, c, atol=1e-10)
    expected_xy = float(np.sum(s[:5] * c) / np.sum(s[:5]))
    expected_yx = float(np.sum(t * c) / np.sum(t))
    assert abs(expected_xy - expected_yx) > 0.2  # the two weightings really differ
    assert pwcca(x, y, epsilon=0.0) == pytest.approx(expected_xy, abs=1e-10)
    assert pwcca(y, x, epsilon=0.0) == pytest.approx(expected_yx, abs=1e-10)
    assert pwcca(x, y, epsilon=0.0, symmetric=True) == pytest.approx(
        0.5 * (expected_xy + expected_yx), abs=1e-10
    )
    # Default ridge changes the values only slightly.
    assert pwcca(x, y) == pytest.approx(expected_xy, abs=1e-4)
    assert pwcca(y, x) == pytest.approx(expected_yx, abs=1e-4)
    both = [pwcca(x, y), pwcca(y, x)]
    assert pwcca(x, y, symmetric=True) == pytest.approx(np.mean(both), abs=1e-12)
    assert pwcca(y, x, symmetric=True) == pytest.approx(np.mean(both), abs=1e-12)


# ---------------------------------------------------------------------------------------- preprocessing


def test_constant_neurons_are_dropped() -> None:
    rng = _rng(14)
    x = rng.standard_normal((5, 500))
    x_with_dead = np.vstack([x[:2], np.zeros((1, 500)), x[2:], np.full((1, 500), 3.0)])
    y = 0.5 * x[:3] + rng.standard_normal((3, 500))
    res = cca(x_with_dead, y)
    np.testing.assert_array_equal(res.x_mask, [True, True, False, True, True, True, False])
    assert np.all(res.y_mask)
    assert np.all(res.x_coefs[:, ~res.x_mask] == 0)
    np.testing.assert_allclose(res.rho, cca(x, y).rho, atol=1e-12)
    assert pwcca(x_with_dead, y) == pytest.approx(pwcca(x, y), abs=1e-12)
    with pytest.raises(ValueError, match="constant"):
        cca(np.ones((3, 100)), y[:, :100])


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 100\).*\(4, 90\)"):
        cca(np.zeros((3, 100)), np.zeros((4, 90)))
    with pytest.raises(ValueError, match=r"\(3, 100\).*\(4, 90\)"):
        linear_cka(np.zeros((3, 100)), np.zeros((4, 90)))
    with pytest.raises(ValueError, match="2-D"):
        pwcca(np.zeros(100), np.zeros((4, 100)))
    with pytest.raises(ValueError, match="NaN"):
        mean_cca(np.full((2, 100), np.nan), np.zeros((2, 100)))


def test_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    rng = _rng(15)
    x = rng.standard_normal((4, 200))
    y = x[:2] + 0.1 * rng.standard_normal((2, 200))
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    assert pwcca(xt, y) == pytest.approx(pwcca(x.astype(np.float32), y), abs=1e-12)
    assert linear_cka(xt, torch.tensor(y)) == pytest.approx(linear_cka(x, y), abs=1e-6)


def test_conv_activations_to_2d() -> None:
    a = _rng(16).standard_normal((3, 4, 2, 5))
    pos = conv_activations_to_2d(a)
    assert pos.shape == (4, 3 * 2 * 5) and pos.dtype == np.float64
    # Datapoint order: input, then row, then column.
    assert pos[1, 0] == a[0, 1, 0, 0]
    assert pos[2, 1] == a[0, 2, 0, 1]
    assert pos[3, 10] == a[1, 3, 0, 0]
    pool = conv_activations_to_2d(a, mode="pool")
    assert pool.shape == (4, 3)
    np.testing.assert_allclose(pool, a.mean(axis=(2, 3)).T)
    with pytest.raises(ValueError, match="4-D"):
        conv_activations_to_2d(a[0])
    with pytest.raises(ValueError, match="mode"):
        conv_activations_to_2d(a, mode="max")  # type: ignore[arg-type]


def test_check_datapoints() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_datapoints(10, 50) is True
        assert check_datapoints(10, 1000, min_ratio=10) is True
    with pytest.warns(InsufficientDatapointsWarning, match=r"only 49 datapoints for 10 neurons"):
        assert check_datapoints(10, 49) is False
    with pytest.raises(ValueError, match=r"only 99 datapoints for 10 neurons"):
        check_datapoints(10, 99, min_ratio=10, strict=True)
    with pytest.raises(ValueError):
        check_datapoints(10, 100, min_ratio=0)
    # cca checks against the larger kept neuron count.
    rng = _rng(17)
    with pytest.warns(InsufficientDatapointsWarning, match="for 20 neurons"):
        cca(rng.standard_normal((20, 60)), rng.standard_normal((2, 60)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(rng.standard_normal((20, 60)), rng.standard_normal((2, 60)), min_ratio=None)


# ------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    nx=st.integers(1, 8),
    ny=st.integers(1, 8),
    n=st.integers(4, 60),
    shared=st.floats(0.0, 3.0),
)
def test_similarity_properties(seed: int, nx: int, ny: int, n: int, shared: float) -> None:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((max(nx, ny), n))
    x = rng.standard_normal((nx, nx)) @ base[:nx] * rng.uniform(0.1, 10.0)
    y = shared * base[:ny] + rng.standard_normal((ny, n))
    k_xy = linear_cka(x, y)
    assert 0.0 <= k_xy <= 1.0
    assert k_xy == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)

    res = cca(x, y, min_ratio=None)
    assert res.num_pairs == min(nx, ny)
    assert np.all((res.rho >= 0) & (res.rho <= 1)) and np.all(np.diff(res.rho) <= 1e-12)
    np.testing.assert_allclose(np.sort(cca(y, x, min_ratio=None).rho), np.sort(res.rho), atol=1e-8)
    for value in (res.pwcca("x"), res.pwcca("y"), res.mean()):
        assert res.rho.min() - 1e-12 <= value <= res.rho.max() + 1e-12
    assert pwcca(x, y, min_ratio=None, symmetric=True) == pytest.approx(
        0.5 * (pwcca(x, y, min_ratio=None) + res.pwcca("y")), abs=1e-12
    )
