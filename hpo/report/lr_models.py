"""Models of the best learning rate against batch size, fitted in log2 with the parameters'
covariance, so a prediction's interval carries the fit's uncertainty (``fit_model`` →
``ModelFit``).

With x = log2 B and y = log2 lr*:

- ``power law``: y = a + α·x (lr* = 2^a · B^α; Goyal et al. 2017's linear rule is α = 1,
  Malladi et al. 2022's square-root rule α = 0.5);
- ``ridge`` (McCandlish et al. 2018): ε_opt(B) = ε_max / (1 + B_noise/B), i.e.
  y = a − log2(1 + 2^(c − x)) with a = log2 ε_max, c = log2 B_noise: linear in B below
  B_noise, flat above;
- ``surge`` (Li et al. 2024, Adam-style optimizers): ε_opt(B) = 2·ε_max /
  (√(B_noise/B) + √(B/B_noise)) = ε_max / cosh(ln(B/B_noise)/2), i.e.
  y = a − log2 cosh((x − c)·ln2/2): rises as √B, peaks at B = B_noise, falls past it.

Each has two parameters. For the ridge and the surge, a has a closed form given c, and c is
searched on a grid from 8 octaves below the smallest to 8 above the largest batch size,
then refined. The covariance is σ²·(JᵀJ)⁺ (J the Jacobian in (a, c) or (a, α)), so a
prediction's variance at x is σ²·(1 + gᵀ(JᵀJ)⁺g), g the gradient of y at x: the
nonlinear-regression prediction interval, which for the power law is exactly the line's
(1 + 1/n + (x − x̄)²/Sxx) and which widens with distance from the studied batch sizes.

Pure: numbers in, numbers out (numpy and scipy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MODELS = ("power law", "ridge", "surge")
# Models for optimizers whose best LR can fall past a peak batch size (Li et al. 2024).
ADAPTIVE_OPTIMIZERS = frozenset({"adam", "adamw"})
# c (log2 B_noise) is searched this many octaves beyond the studied batch sizes.
_SPAN_OCTAVES = 8.0
_GRID_STEP = 1.0 / 16


def models_for(optimizer: str | None) -> tuple[str, ...]:
    """The candidate models: the surge only for Adam-style optimizers, whose best LR can
    fall past a peak batch size; with SGD the best LR only saturates (McCandlish)."""
    if optimizer is not None and optimizer.lower() in ADAPTIVE_OPTIMIZERS:
        return MODELS
    return MODELS[:2]


def _shape(model: str) -> Callable[[np.ndarray, float], np.ndarray]:
    """y − a as a function of x and the model's second parameter c."""
    if model == "ridge":
        return lambda x, c: -np.logaddexp2(0.0, c - x)
    if model == "surge":
        # log2 cosh(u) = log2((2^(u/ln2) + 2^(−u/ln2))/2), computed without overflow
        return lambda x, c: -(np.logaddexp2((x - c) / 2, (c - x) / 2) - 1.0)
    raise ValueError(f"unknown model {model!r}")


@dataclass(frozen=True)
class ModelFit:
    """One model fitted to (x, y) points: its parameters, their unscaled covariance
    (JᵀJ)⁺, the residual standard deviation (None with two points: an exact fit) and
    degrees of freedom n − 2."""

    model: str
    params: tuple[float, float]
    unscaled_covariance: np.ndarray
    residual_sd: float | None
    n_points: int

    @property
    def dof(self) -> int:
        return self.n_points - 2

    def log2_lr(self, log2_batch_size: float) -> float:
        a, second = self.params
        if self.model == "power law":
            return a + second * log2_batch_size
        return a + float(_shape(self.model)(np.array([log2_batch_size]), second)[0])

    def gradient(self, log2_batch_size: float) -> np.ndarray:
        """∂y/∂(a, second parameter) at x."""
        if self.model == "power law":
            return np.array([1.0, log2_batch_size])
        return np.array([1.0, _dshape_dc(self.model, log2_batch_size, self.params[1])])

    def leverage(self, log2_batch_size: float) -> float:
        """gᵀ(JᵀJ)⁺g: the fitted curve's variance at x in units of σ²."""
        g = self.gradient(log2_batch_size)
        return float(max(0.0, g @ self.unscaled_covariance @ g))

    @property
    def b_noise(self) -> float | None:
        """B_noise (the ridge's knee, the surge's peak); None for the power law."""
        return None if self.model == "power law" else 2.0 ** self.params[1]


def _dshape_dc(model: str, x: float, c: float, step: float = 1e-4) -> float:
    shape = _shape(model)
    ahead, behind = shape(np.array([x]), c + step), shape(np.array([x]), c - step)
    return float((ahead[0] - behind[0]) / (2 * step))


def fit_model(model: str, points: list[tuple[float, float]]) -> ModelFit:
    """Least squares of ``model`` on (batch size, lr) ``points`` in log2 (two or more
    distinct batch sizes; ValueError otherwise)."""
    x = np.log2([b for b, _ in points])
    y = np.log2([lr for _, lr in points])
    if len(set(x.tolist())) < 2:
        raise ValueError("a model of the best LR needs two or more batch sizes")
    if model == "power law":
        slope, intercept = np.polyfit(x, y, 1)
        params = (float(intercept), float(slope))
        jacobian = np.column_stack([np.ones_like(x), x])
    else:
        c = _best_c(model, x, y)
        a = float(np.mean(y - _shape(model)(x, c)))
        params = (a, c)
        derivatives = [_dshape_dc(model, float(xi), c) for xi in x]
        jacobian = np.column_stack([np.ones_like(x), derivatives])
    fitted = ModelFit(model, params, np.zeros((2, 2)), None, len(points))
    residuals = y - np.array([fitted.log2_lr(float(xi)) for xi in x])
    sd = math.sqrt(float(residuals @ residuals) / (len(x) - 2)) if len(x) > 2 else None
    covariance = np.linalg.pinv(jacobian.T @ jacobian)
    return ModelFit(model, params, covariance, sd, len(points))


def _sse(model: str, x: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The squared error at each of the values ``c`` (a in closed form for each)."""
    shifted = y[None, :] - _shape(model)(x[None, :], c[:, None])
    residual = shifted - shifted.mean(axis=1, keepdims=True)
    return (residual * residual).sum(axis=1)


def _best_c(model: str, x: np.ndarray, y: np.ndarray) -> float:
    """c minimising the squared error (a in closed form): a grid, then a finer grid
    between the best grid point's neighbours, twice."""
    low, high = float(x.min()) - _SPAN_OCTAVES, float(x.max()) + _SPAN_OCTAVES
    grid = np.arange(low, high + _GRID_STEP / 2, _GRID_STEP)
    for _ in range(3):
        best = int(np.argmin(_sse(model, x, y, grid)))
        left, right = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
        grid = np.linspace(left, right, 33)
    return float(grid[int(np.argmin(_sse(model, x, y, grid)))])


def leave_one_out_error(model: str, points: list[tuple[float, float]]) -> float:
    """Root mean squared error (log2 LR) of ``model`` predicting each batch size's best LR
    from the other batch sizes' points (three or more batch sizes)."""
    squares = []
    for index, (batch_size, lr) in enumerate(points):
        rest = points[:index] + points[index + 1 :]
        fitted = fit_model(model, rest)
        squares.append((fitted.log2_lr(math.log2(batch_size)) - math.log2(lr)) ** 2)
    return math.sqrt(sum(squares) / len(squares))
