"""Representation similarity: CCA, projection-weighted CCA (PWCCA) and linear CKA, all in float64.

Conventions
-----------
* CCA-family functions (:func:`cca`, :func:`pwcca`, :func:`mean_cca`) and :func:`linear_cka` take
  activations **neuron-major**: ``x`` has shape ``[neurons_x, datapoints]`` and ``y``
  ``[neurons_y, datapoints]``; column ``d`` of both is the response to the same input ``d``. This is the
  layout of google/svcca.
* Conv activations ``[N, C, H, W]`` are brought to that layout by :func:`conv_activations_to_2d`, either
  treating every spatial position as a datapoint (``[C, N*H*W]``) or average-pooling space away
  (``[C, N]``).
* CCA needs many more datapoints than neurons, or it finds spurious perfect correlations (two random sets
  of ``p`` and ``q`` neurons are perfectly correlated in ``p + q - datapoints + 1`` directions once
  ``p + q >= datapoints``). :func:`check_datapoints` warns below ``min_ratio`` (default 5) datapoints per
  neuron, and :func:`cca` runs it by default. Always report a random-init and a same-task-other-seed
  baseline beside any similarity value (docs/design.md, "Representation similarity"): a number alone is not
  interpretable.

Algorithm (:func:`cca`)
-----------------------
Each neuron is centred over the datapoints; neurons whose standard deviation is below ``drop_tol`` times
the largest one of their side are dropped (dead ReLUs, constant features). The remaining neurons are scaled
to unit variance, which leaves CCA unchanged in exact arithmetic but makes ``epsilon`` a dimensionless
ridge on the correlation matrices: ``W_x = (R_xx + epsilon I)^-1/2``. The canonical correlations are the
singular values of ``W_x R_xy W_y`` (clipped to [0, 1], sorted descending), and the canonical variates
are ``u_i^T W_x x_std`` and ``v_i^T W_y y_std`` for the singular vector pairs ``(u_i, v_i)``.

PWCCA (Morcos et al. 2018, "Insights on representational similarity in neural networks with canonical
correlation") weights the correlations by how much of one side's activations each canonical direction
accounts for: ``alpha_i = sum_j |<h_i, x_j>|`` with ``h_i`` the unit-norm canonical variates of that side
and ``x_j`` its centred (unscaled) neurons, normalised to sum to 1; the score is ``sum_i alpha_i rho_i``.
**The weighting side is always the first argument** of :func:`pwcca`, whichever side has more neurons,
so ``pwcca(x, y)`` answers "how much of x's activity is reproduced by y". google/svcca's
``compute_pwcca`` instead weights by whichever side has fewer neurons and, when that is the second
argument, applies the second side's coefficients to the first side's activations (a shape error or a
wrong answer); pass the smaller layer first to reproduce its intended behaviour.
``pwcca(..., symmetric=True)`` averages the two weightings of one CCA.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CCAResult",
    "InsufficientDatapointsWarning",
    "cca",
    "check_datapoints",
    "conv_activations_to_2d",
    "linear_cka",
    "linear_cka_debiased",
    "mean_cca",
    "pwcca",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class InsufficientDatapointsWarning(UserWarning):
    """Too few datapoints per neuron for CCA-based similarity to be trustworthy."""


@dataclass(frozen=True)
class CCAResult:
    """Result of :func:`cca` between ``x`` ``[neurons_x, datapoints]`` and ``y`` ``[neurons_y, datapoints]``.

    ``k = min(kept_x, kept_y)`` canonical pairs are returned; index ``i`` pairs ``x_variates[i]`` with
    ``y_variates[i]`` and their correlation is ``rho[i]``.

    Attributes:
        rho: ``[k]`` canonical correlations in [0, 1], sorted descending.
        x_variates: ``[k, datapoints]`` canonical variates of x: zero mean, unit variance (ddof=1;
            slightly less than 1 when ``epsilon > 0``), mutually uncorrelated.
        y_variates: ``[k, datapoints]`` canonical variates of y, same normalisation.
        x_coefs: ``[k, neurons_x]`` canonical weights over all neurons of x (zero for dropped neurons):
            ``x_variates = x_coefs @ (x - x_mean[:, None])``. They apply to new data as well.
        y_coefs: ``[k, neurons_y]`` canonical weights of y.
        x_mean: ``[neurons_x]`` per-neuron means that were removed from x.
        y_mean: ``[neurons_y]`` per-neuron means of y.
        x_mask: ``[neurons_x]`` True for neurons of x that were kept (not near-constant).
        y_mask: ``[neurons_y]`` True for kept neurons of y.
        x_weights: ``[k]`` PWCCA projection weights of x's canonical directions (sum 1).
        y_weights: ``[k]`` PWCCA projection weights of y's canonical directions (sum 1).
        epsilon: the ridge added to the diagonal of each side's correlation matrix.
    """

    rho: FloatArray
    x_variates: FloatArray
    y_variates: FloatArray
    x_coefs: FloatArray
    y_coefs: FloatArray
    x_mean: FloatArray
    y_mean: FloatArray
    x_mask: BoolArray
    y_mask: BoolArray
    x_weights: FloatArray
    y_weights: FloatArray
    epsilon: float

    @property
    def num_pairs(self) -> int:
        """Number ``k`` of canonical pairs."""
        return int(self.rho.shape[0])

    def mean(self) -> float:
        """Unweighted mean of the canonical correlations."""
        return float(np.mean(self.rho))

    def pwcca(self, side: Literal["x", "y", "both"] = "x") -> float:
        """Projection-weighted mean correlation, weighted by ``side``'s activations ("both": x/y mean)."""
        if side == "x":
            return float(np.dot(self.x_weights, self.rho))
        if side == "y":
            return float(np.dot(self.y_weights, self.rho))
        if side == "both":
            return 0.5 * (self.pwcca("x") + self.pwcca("y"))
        raise ValueError(f"side must be 'x', 'y' or 'both', got {side!r}")


def check_datapoints(n_neurons: int, n_datapoints: int, min_ratio: float = 5.0, strict: bool = False) -> bool:
    """Check that there are at least ``min_ratio`` datapoints per neuron.

    Returns True when there are enough. Otherwise warns with :class:`InsufficientDatapointsWarning` and
    returns False, or raises ValueError when ``strict``. CCA needs 5-10x more datapoints than neurons
    (docs/design.md, "Representation similarity").
    """
    n_neurons = int(n_neurons)
    n_datapoints = int(n_datapoints)
    if n_neurons < 0 or n_datapoints < 0:
        raise ValueError(
            f"counts must be non-negative, got {n_neurons} neurons and {n_datapoints} datapoints"
        )
    if not min_ratio > 0:
        raise ValueError(f"min_ratio must be positive, got {min_ratio}")
    needed = min_ratio * n_neurons
    if n_datapoints >= needed:
        return True
    message = (
        f"only {n_datapoints} datapoints for {n_neurons} neurons "
        f"(ratio {n_datapoints / max(n_neurons, 1):.2f}); "
        f"CCA-based similarity needs at least {min_ratio:g}x as many datapoints as neurons "
        f"(>= {int(np.ceil(needed))}) or it reports spurious correlations"
    )
    if strict:
        raise ValueError(message)
    warnings.warn(message, InsufficientDatapointsWarning, stacklevel=2)
    return False


def _as_2d_float64(a: Any, name: str) -> FloatArray:
    """Convert array-likes (including CPU/GPU torch tensors) to a finite float64 2-D array."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [neurons, datapoints], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no neurons (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_pair(x: Any, y: Any, min_datapoints: int = 2) -> tuple[FloatArray, FloatArray]:
    xa = _as_2d_float64(x, "x")
    ya = _as_2d_float64(y, "y")
    if xa.shape[1] != ya.shape[1]:
        raise ValueError(
            "x and y must have the same number of datapoints (columns): "
            + f"x has shape {xa.shape}, y has shape {ya.shape}"
        )
    if xa.shape[1] < min_datapoints:
        raise ValueError(f"need at least {min_datapoints} datapoints, got x {xa.shape} and y {ya.shape}")
    return xa, ya


def _centre_and_select(a: FloatArray, drop_tol: float, name: str) -> tuple[FloatArray, FloatArray, BoolArray]:
    """Centre each neuron and mark those whose std is at least ``drop_tol`` times the largest std."""
    mean = a.mean(axis=1)
    centred = a - mean[:, None]
    std = np.sqrt(np.einsum("ij,ij->i", centred, centred) / (a.shape[1] - 1))
    top = float(std.max())
    if top == 0.0:
        raise ValueError(f"every neuron of {name} is constant over the datapoints; similarity is undefined")
    mask = std >= drop_tol * top
    return mean, centred, mask


def _inv_sqrt_psd(c: FloatArray) -> FloatArray:
    """``c^-1/2`` of a symmetric PSD matrix; numerically null eigen-directions map to zero (as pinv)."""
    w, v = np.linalg.eigh(c)
    cutoff = max(float(w.max()), 0.0) * c.shape[0] * np.finfo(np.float64).eps
    inv = np.zeros_like(w)
    keep = w > cutoff
    inv[keep] = 1.0 / np.sqrt(w[keep])
    return (v * inv) @ v.T


def _projection_weights(variates: FloatArray, centred: FloatArray) -> FloatArray:
    """``alpha_i = sum_j |<h_i / ||h_i||, a_j>|`` over the neurons ``a_j`` of ``centred``, summing to 1."""
    norms = np.linalg.norm(variates, axis=1)
    unit = np.zeros_like(variates)
    ok = norms > 0
    unit[ok] = variates[ok] / norms[ok, None]
    alpha = np.abs(unit @ centred.T).sum(axis=1)
    total = alpha.sum()
    if total <= 0:
        return np.full(variates.shape[0], 1.0 / variates.shape[0])
    return alpha / total


def cca(
    x: Any,
    y: Any,
    epsilon: float = 1e-6,
    *,
    drop_tol: float = 1e-6,
    min_ratio: float | None = 5.0,
) -> CCAResult:
    """Canonical correlation analysis between two sets of neurons observed on the same datapoints.

    Args:
        x: activations ``[neurons_x, datapoints]``.
        y: activations ``[neurons_y, datapoints]`` on the same datapoints, in the same order.
        epsilon: ridge added to the diagonal of each side's (unit-diagonal) correlation matrix before the
            inverse square root; 0 gives exact CCA with a pseudo-inverse for rank-deficient inputs.
        drop_tol: neurons whose standard deviation is below ``drop_tol`` times the largest of their side are
            dropped (reported in ``x_mask`` / ``y_mask``).
        min_ratio: run :func:`check_datapoints` (warning only) with this ratio against the larger kept neuron
            count; None disables the check.

    Returns:
        A :class:`CCAResult`.

    Raises:
        ValueError: if the datapoint counts differ (the message names both shapes), inputs are not 2-D or not
            finite, there are fewer than 2 datapoints, or every neuron of one side is constant.
    """
    xa, ya = _check_pair(x, y)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= drop_tol < 1:
        raise ValueError(f"drop_tol must be in [0, 1), got {drop_tol}")
    n = xa.shape[1]
    x_mean, xc, x_mask = _centre_and_select(xa, drop_tol, "x")
    y_mean, yc, y_mask = _centre_and_select(ya, drop_tol, "y")
    xk, yk = xc[x_mask], yc[y_mask]
    if min_ratio is not None:
        check_datapoints(max(xk.shape[0], yk.shape[0]), n, min_ratio=min_ratio)

    x_std = np.linalg.norm(xk, axis=1) / np.sqrt(n - 1)
    y_std = np.linalg.norm(yk, axis=1) / np.sqrt(n - 1)
    xs = xk / x_std[:, None]
    ys = yk / y_std[:, None]
    r_xx = (xs @ xs.T) / (n - 1)
    r_yy = (ys @ ys.T) / (n - 1)
    r_xy = (xs @ ys.T) / (n - 1)
    w_x = _inv_sqrt_psd(r_xx + epsilon * np.eye(r_xx.shape[0]))
    w_y = _inv_sqrt_psd(r_yy + epsilon * np.eye(r_yy.shape[0]))

    u, s, vt = np.linalg.svd(w_x @ r_xy @ w_y, full_matrices=False)
    rho = np.clip(s, 0.0, 1.0)

    # Canonical weights on the standardised kept neurons, then on the raw centred values of all neurons.
    a_std = u.T @ w_x  # [k, kept_x]
    b_std = vt @ w_y  # [k, kept_y]
    x_variates = a_std @ xs
    y_variates = b_std @ ys
    x_coefs = np.zeros((rho.shape[0], xa.shape[0]))
    y_coefs = np.zeros((rho.shape[0], ya.shape[0]))
    x_coefs[:, x_mask] = a_std / x_std[None, :]
    y_coefs[:, y_mask] = b_std / y_std[None, :]

    return CCAResult(
        rho=rho,
        x_variates=x_variates,
        y_variates=y_variates,
        x_coefs=x_coefs,
        y_coefs=y_coefs,
        x_mean=x_mean,
        y_mean=y_mean,
        x_mask=x_mask,
        y_mask=y_mask,
        x_weights=_projection_weights(x_variates, xk),
        y_weights=_projection_weights(y_variates, yk),
        epsilon=float(epsilon),
    )


def pwcca(
    x: Any,
    y: Any,
    epsilon: float = 1e-6,
    *,
    symmetric: bool = False,
    drop_tol: float = 1e-6,
    min_ratio: float | None = 5.0,
) -> float:
    """Projection-weighted CCA similarity (Morcos et al. 2018), in [0, 1].

    The canonical correlations of :func:`cca` are weighted by how much of the **first argument's** centred
    activations each of its canonical directions accounts for (see the module docstring), for any neuron
    counts.
    ``symmetric=True`` returns the mean of the x-weighted and y-weighted scores of the same CCA, which equals
    ``(pwcca(x, y) + pwcca(y, x)) / 2``. The score is not symmetric in general; ``1 - pwcca`` is the PWCCA
    distance of the paper.
    """
    res = cca(x, y, epsilon, drop_tol=drop_tol, min_ratio=min_ratio)
    return res.pwcca("both" if symmetric else "x")


def mean_cca(
    x: Any,
    y: Any,
    epsilon: float = 1e-6,
    *,
    drop_tol: float = 1e-6,
    min_ratio: float | None = 5.0,
) -> float:
    """Plain mean of the ``min(neurons_x, neurons_y)`` canonical correlations of :func:`cca`, in [0, 1]."""
    return cca(x, y, epsilon, drop_tol=drop_tol, min_ratio=min_ratio).mean()


def _centred_datapoint_major(x: Any, y: Any, min_datapoints: int) -> tuple[FloatArray, FloatArray]:
    xa, ya = _check_pair(x, y, min_datapoints)
    xd = xa.T - xa.mean(axis=1)[None, :]
    yd = ya.T - ya.mean(axis=1)[None, :]
    return xd, yd


def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019), in [0, 1].

    Inputs are neuron-major like the CCA functions (``[neurons, datapoints]``). Internally they are
    transposed to the datapoint-major convention of the paper, ``X [datapoints, neurons_x]`` and
    ``Y [datapoints, neurons_y]``, each column centred, and::

        CKA = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

    (evaluated through the ``datapoints x datapoints`` Gram matrices when there are fewer datapoints than
    neurons, which gives the same value). Invariant to orthogonal transforms and isotropic scaling of either
    side's neurons, but not to arbitrary invertible linear maps. No neuron is dropped and no ratio of
    datapoints to neurons is required, although the estimate is biased upwards for few datapoints (see
    :func:`linear_cka_debiased`).

    Raises:
        ValueError: on mismatched datapoint counts or when one side has no variance at all.
    """
    xd, yd = _centred_datapoint_major(x, y, 2)
    n = xd.shape[0]
    if n < max(xd.shape[1], yd.shape[1]):
        k = xd @ xd.T
        l_ = yd @ yd.T
        cross = float(np.sum(k * l_))
        norm_x = float(np.linalg.norm(k))
        norm_y = float(np.linalg.norm(l_))
    else:
        cross = float(np.linalg.norm(yd.T @ xd) ** 2)
        norm_x = float(np.linalg.norm(xd.T @ xd))
        norm_y = float(np.linalg.norm(yd.T @ yd))
    if norm_x == 0.0 or norm_y == 0.0:
        raise ValueError("linear CKA is undefined when one side has no variance (all neurons constant)")
    return float(np.clip(cross / (norm_x * norm_y), 0.0, 1.0))


def _unbiased_hsic(xd: FloatArray, yd: FloatArray) -> float:
    """Unbiased HSIC estimator of Song et al. (2012) for linear kernels on centred datapoint-major features.

    With ``K = X X^T`` and ``L = Y Y^T`` with their diagonals zeroed (``K~``, ``L~``)::

        HSIC_u = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

    Every term is evaluated in feature space, so memory stays O(n * neurons).
    """
    n = xd.shape[0]
    dk = np.einsum("ij,ij->i", xd, xd)  # diag(K)
    dl = np.einsum("ij,ij->i", yd, yd)
    trace_kl = float(np.linalg.norm(yd.T @ xd) ** 2 - dk @ dl)
    k1 = xd @ xd.sum(axis=0) - dk  # K~ 1
    l1 = yd @ yd.sum(axis=0) - dl
    sum_k = float(k1.sum())
    sum_l = float(l1.sum())
    value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)
    return value / (n * (n - 3))


def linear_cka_debiased(x: Any, y: Any) -> float:
    """Linear CKA with the unbiased HSIC estimator (Kornblith et al. 2019, Song et al. 2012).

    Same conventions as :func:`linear_cka` (features centred first). Removes the upward bias of plain CKA at
    few datapoints: for independent data it is close to 0 (and may be slightly negative), while it converges
    to :func:`linear_cka` as the number of datapoints grows. Needs at least 4 datapoints.

    Raises:
        ValueError: on mismatched or too few datapoints, or when a side's self-HSIC estimate is not positive.
    """
    xd, yd = _centred_datapoint_major(x, y, 4)
    hxx = _unbiased_hsic(xd, xd)
    hyy = _unbiased_hsic(yd, yd)
    if not (hxx > 0 and hyy > 0):
        raise ValueError(
            "debiased CKA is undefined: a self-HSIC estimate is not positive (too little variance)"
        )
    return float(_unbiased_hsic(xd, yd) / np.sqrt(hxx * hyy))


def conv_activations_to_2d(a: Any, mode: Literal["positions", "pool"] = "positions") -> FloatArray:
    """Reshape conv activations ``[N, C, H, W]`` to neuron-major ``[C, datapoints]`` float64.

    ``mode="positions"``: every spatial position of every input is a datapoint, ``[C, N*H*W]`` (ordered
    input-major, then row, then column). ``mode="pool"``: average-pool over ``H, W``, ``[C, N]``.
    Positions give many more datapoints per channel, which CCA needs (:func:`check_datapoints`).
    """
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"conv activations must be 4-D [N, C, H, W], got shape {arr.shape}")
    n, c, h, w = arr.shape
    if mode == "positions":
        return np.ascontiguousarray(arr.transpose(1, 0, 2, 3).reshape(c, n * h * w))
    if mode == "pool":
        return np.ascontiguousarray(arr.mean(axis=(2, 3)).T)
    raise ValueError(f"mode must be 'positions' or 'pool', got {mode!r}")
