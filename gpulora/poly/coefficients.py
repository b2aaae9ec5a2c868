"""Polynomials p(t) ~ exp(t) on [-M, M], their errors, and the choice of family, degree and precision.

Three families, each given by monomial coefficients ``c_0 .. c_g`` of ``p(t) = sum_m c_m t^m``:

``taylor`` (the paper's)
    ``c_m = 1 / m!``. Relative error ``|p(t) - e^t| / e^t`` is largest at ``t = -M`` (terms up to
    ``M^g / g!`` cancel down to ``e^-M``); for ``M >~ 2`` it is not monotone in ``g`` and odd ``g`` can
    make ``p`` negative, so every weight and normaliser positivity is checked.
``shifted_taylor``
    The Taylor series about ``-M``: ``e^t = e^-M sum_m (t + M)^m / m!``, expanded in monomials of ``t``:
    ``c_j = e^-M / j! * sum_{i <= g - j} M^i / i!``. Every coefficient is positive, so ``p > 0`` on the
    whole real line, and the relative error is the Poisson tail ``Pr[Poisson(2M) > g]``, monotone in ``g``.
``chebyshev``
    Interpolation at Chebyshev points of ``[-M, M]`` (near-minimax), converted to monomial coefficients.
    The fewest degrees for a target error once ``g`` is large enough; can go negative at low ``g`` and
    loses float64 accuracy in the monomial basis from ``M`` about 13 (both are measured, not assumed).

**Errors.** The approximation error of a candidate is measured on a grid of ``[-M, M]`` (cheap, independent
of ``L``). The rounding error is estimated as ``u * kappa`` with ``u`` the unit roundoff of the compute
dtype and ``kappa = sum_m |c_m| M^m / min_{[-M, M]} p`` the cancellation factor: the feature dot product
``phi(q) . psi(k)`` adds terms of total size up to ``sum_m |c_m| (|q| |k|)^m`` to produce a value as small
as ``p(-M) ~ e^-M`` (for taylor ``kappa ~ e^{2M}``; docs/math.md section 7). Against measured rounding errors the
estimate is conservative by 3..20x. A problem is computed in its input dtype when approximation plus
rounding stay within ``tol``, else in float64; when even float64 cannot, :func:`choose` refuses.

**Where no polynomial can work.** For any ``p`` within a relative ``e`` of ``exp`` at ``t = +-M``,
``sum_m |c_m| M^m >= p(M) >= (1 - e) e^M`` and ``min p <= p(-M) <= (1 + e) e^-M``, so
``kappa >= (1 - e) / (1 + e) * e^{2M}``: the rounding alone exceeds ``tol`` in float64 once
``M > feasible_bound(tol) = 0.5 ln(tol (1 + tol) / (u (1 - tol)))`` (14.9 at tol 1e-3). :func:`choose`
refuses such bounds at once, without searching (no overflow, no warning, whatever ``M``). A fixed degree
is accepted only with ``e <`` :data:`MAX_FIXED_DEGREE_ERROR` ``= 1``, so ``1 - e >= u`` in float64, and
rounding below 1: it is refused from ``M > 0.5 ln(2 / u^2)`` (37.1) on the same grounds.

**Default tolerance.** :data:`DEFAULT_TOL` ``= 1e-3`` on the max relative error of ``exp``; the softmax
and the gradients then carry relative errors of a small multiple of it (see ``gpulora.poly.chain``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .monomials import feature_dim

__all__ = ["DEFAULT_TOL", "FAMILIES", "MAX_DEGREE", "MAX_FIXED_DEGREE_ERROR", "PolyChoice", "choose", "coefficients",
           "evaluate", "feasible_bound", "measure"]

FAMILIES = ("taylor", "shifted_taylor", "chebyshev")
DEFAULT_TOL = 1e-3
MAX_DEGREE = 40
MAX_FIXED_DEGREE_ERROR = 1.0  # a fixed degree worse than this (factor-2 errors in exp) is refused
_GRID = 2049
_TINY_BOUND = 1e-6  # [-M, M] degenerates below this: the grid and Chebyshev nodes need a width


def _unit_roundoff(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def feasible_bound(tol: float, dtype=np.float64) -> float:
    """The largest ``M`` at which some polynomial could still meet ``tol`` (approximation plus rounding) in
    ``dtype``: ``0.5 ln(tol (1 + tol) / (u (1 - tol)))``, from ``kappa >= (1 - tol) / (1 + tol) e^{2M}``
    (module docstring). 14.9 in float64 and 4.9 in float32 at tol 1e-3."""
    return 0.5 * math.log(tol * (1 + tol) / (_unit_roundoff(dtype) * (1 - tol)))


# an accepted fixed degree has a float64 approximation error e < 1, so 1 - e >= u, and rounding below its
# budget max(tol, e) < 1: u kappa >= u (1 - e) / (1 + e) e^{2M} >= (u^2 / 2) e^{2M} must stay below 1
_FIXED_DEGREE_BOUND = 0.5 * math.log(2 / _unit_roundoff(np.float64) ** 2)


@functools.lru_cache(maxsize=4096)
def _coefficients(family: str, g: int, bound: float) -> tuple[float, ...]:
    m = max(bound, _TINY_BOUND)
    if family == "taylor":
        c = [1.0 / math.factorial(j) for j in range(g + 1)]
    elif family == "shifted_taylor":
        # c_j = sum_{i <= g - j} pois[i] / j! with pois[i] = e^-M M^i / i! (Poisson probabilities, at most
        # 1: no overflow at any M), built by pois[i] = pois[i - 1] M / i
        pois = [math.exp(-m)]
        for i in range(1, g + 1):
            pois.append(pois[-1] * m / i)
        tail = np.cumsum(pois)  # tail[n] = sum_{i <= n} pois[i]
        c = [float(tail[g - j]) / math.factorial(j) for j in range(g + 1)]
    elif family == "chebyshev":
        # exp overflows past M ~ 709: inf/nan coefficients are the expected signal there (measure maps
        # them to an infinite error)
        with np.errstate(over="ignore", invalid="ignore"):
            cheb = np.polynomial.Chebyshev.interpolate(np.exp, g, domain=[-m, m])
            c = list(cheb.convert(kind=np.polynomial.Polynomial).coef) + [0.0] * g
        c = c[: g + 1]
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return tuple(float(v) for v in c)


def coefficients(family: str, g: int, bound: float) -> np.ndarray:
    """Monomial coefficients ``c_0 .. c_g`` (float64, shape ``(g + 1,)``) of ``p ~ exp`` on ``[-bound, bound]``."""
    return np.array(_coefficients(family, int(g), float(bound)))


def evaluate(coef, t) -> np.ndarray:
    """``p(t) = sum_m coef[m] t^m`` in float64 (Horner)."""
    return np.polynomial.polynomial.polyval(np.asarray(t, dtype=np.float64), np.asarray(coef))


@dataclasses.dataclass(frozen=True)
class PolyChoice:
    """A polynomial ``p ~ exp`` on ``[-bound, bound]`` with its measured errors.

    Attributes
    ----------
    family : str
        One of :data:`FAMILIES`.
    degree : int
        ``g``.
    bound : float
        ``M``, the half-width of the interval the polynomial must cover.
    coef : tuple of float
        Monomial coefficients ``c_0 .. c_g``.
    approx_error : float
        ``max |p(t) - e^t| / e^t`` on a grid of ``[-M, M]`` (float64).
    min_value : float
        ``min p`` on that grid; every normaliser ``D_i = sum_j p(s_ij)`` is at least ``L * min_value``.
    kappa : float
        Cancellation factor ``sum_m |c_m| M^m / min_value`` (rounding amplification).
    budget : float
        The error budget :func:`choose` selected it for (``tol``, or the accepted approximation error of
        a fixed degree); 0 when built directly. Run-time checks hold the measured rounding to it.
    """

    family: str
    degree: int
    bound: float
    coef: tuple
    approx_error: float
    min_value: float
    kappa: float
    budget: float = 0.0

    @property
    def positive(self) -> bool:
        """True when ``p > 0`` on the grid of ``[-M, M]``, so softmax weights and normalisers are positive."""
        return self.min_value > 0

    def rounding_error(self, dtype) -> float:
        """Estimated relative rounding error of ``phi(q) . psi(k)`` computed in ``dtype``: ``u * kappa``."""
        return _unit_roundoff(dtype) * self.kappa

    def total_error(self, dtype) -> float:
        """Approximation plus estimated rounding error, in ``dtype``."""
        return self.approx_error + self.rounding_error(dtype)

    def features(self, d: int) -> int:
        """Feature dimension for rows of width ``d``: ``C(d + g, g)``."""
        return feature_dim(d, self.degree)


@functools.lru_cache(maxsize=4096)
def measure(family: str, g: int, bound: float) -> PolyChoice:
    """The degree-``g`` polynomial of ``family`` on ``[-bound, bound]`` with its errors measured on a grid
    (cached). :func:`choose` picks among these; the result's ``budget`` is 0."""
    m = max(bound, _TINY_BOUND)
    coef = _coefficients(family, g, bound)
    t = np.linspace(-m, m, _GRID)
    # Past M ~ 700, exp(t), p(t) and M^g overflow: inf/nan errors are the expected signal, mapped to an
    # infinite error (choose never gets here for such bounds; direct callers such as the phase sweep do)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p = evaluate(coef, t)
        exact = np.exp(t)
        approx = float(np.max(np.abs(p - exact) / exact))
        pmin = float(np.min(p))
        size = float(np.sum(np.abs(np.asarray(coef)) * np.power(m, np.arange(g + 1, dtype=np.float64))))
        kappa = size / pmin if pmin > 0 else math.inf
    if not math.isfinite(approx):
        approx = math.inf
    if math.isnan(pmin):
        pmin = -math.inf
    if math.isnan(kappa):
        kappa = math.inf
    return PolyChoice(family, g, float(bound), coef, approx, pmin, kappa)


def _check_family(family):
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")


def choose(bound: float, *, tol=None, degree=None, family=None, dtype=np.float64) -> tuple[PolyChoice, np.dtype]:
    """Choose the polynomial and the compute dtype for scores bounded by ``|s| <= bound``.

    Parameters
    ----------
    bound : float
        ``M >= 0``, an upper bound on every ``|s_ij|``.
    tol : float, optional
        Target max relative error of ``p ~ exp`` on ``[-M, M]``, approximation plus rounding.
        Default :data:`DEFAULT_TOL`. With ``degree`` given, only used to decide the compute precision.
    degree : int, optional
        Fix ``g`` instead of choosing the smallest one that meets ``tol``.
    family : str, optional
        Restrict to one family; by default all are tried and, at the smallest degree, the one with the
        least total error (computable in ``dtype`` preferred) wins.
    dtype : float32 or float64
        The input dtype; the compute dtype returned is this or float64.

    Returns
    -------
    (PolyChoice, numpy.dtype)
        The polynomial and the dtype the features and their sums must be computed in.

    Raises
    ------
    ValueError
        When no positive polynomial of degree <= :data:`MAX_DEGREE` meets ``tol`` (the bound is past what
        the polynomial method can do: use ``method="exact"``), when a fixed ``degree`` gives a polynomial
        that is not positive on ``[-M, M]`` or whose relative error reaches :data:`MAX_FIXED_DEGREE_ERROR`,
        or when rounding would swamp the result even in float64.
    """
    _check_family(family)
    dtype = np.dtype(dtype)
    families = FAMILIES if family is None else (family,)
    target = DEFAULT_TOL if tol is None else float(tol)
    bound = float(bound)
    if not (math.isfinite(bound) and bound >= 0):
        raise ValueError(f"the score bound M must be a finite number >= 0, got {bound}")
    limit = _FIXED_DEGREE_BOUND if degree is not None else feasible_bound(target)
    if limit < 0:  # even M = 0 (p = 1) rounds past tol: the request, not the bound, is out of reach
        raise ValueError(f"tol={target:.3g} is below float64 rounding (unit roundoff "
                         f"{_unit_roundoff(np.float64):.3g}): no polynomial's evaluation can meet it; use "
                         f"method='exact' or a larger tol")
    if bound > limit:
        what = f"of degree {degree} is usable" if degree is not None else f"reaches tol={target:.3g}"
        raise ValueError(
            f"no polynomial {what} for exp on [-M, M] with M = {bound:.3g} (the bound beta * max|q_i| * "
            f"max|k_j|): past M = {limit:.3g} its terms cancel by a factor growing like e^(2M), so float64 "
            f"rounding alone would exceed {'any usable error' if degree is not None else 'tol'}. This problem "
            f"is past the phase transition of the polynomial method; use method='exact' (or method='auto')"
        )

    def rank(c):  # fits in the input dtype first, then the least total error
        return (c.total_error(dtype) > target, c.total_error(np.float64))

    if degree is not None:
        cands = [measure(f, int(degree), bound) for f in families]
        positive = [c for c in cands if c.positive]
        if not positive:
            raise ValueError(
                f"degree={degree}: the {'/'.join(families)} polynomial is not positive on [-M, M] with "
                f"M = {bound:.3g}, so softmax normalisers could vanish; raise the degree or use "
                f"family='shifted_taylor' (positive at every degree)"
            )
        best = min(positive, key=rank)
        if best.approx_error >= MAX_FIXED_DEGREE_ERROR:
            raise ValueError(
                f"degree={degree}: the best polynomial of that degree ({best.family}) approximates exp on "
                f"[-M, M], M = {bound:.3g}, only to a relative error of {best.approx_error:.3g}; raise the "
                f"degree, pass tol= instead, or use method='exact'"
            )
        # The caller accepts this degree's approximation error; rounding must not dominate it.
        budget, base = max(target, best.approx_error), 0.0
    else:
        best = None
        for g in range(1, MAX_DEGREE + 1):
            ok = [c for c in (measure(f, g, bound) for f in families)
                  if c.positive and c.total_error(np.float64) <= target]
            if ok:
                best = min(ok, key=rank)
                break
        if best is None:
            raise ValueError(
                f"no polynomial of degree <= {MAX_DEGREE} reaches tol={target:.3g} for exp on [-M, M] with "
                f"M = {bound:.3g} (the bound beta * max|q_i| * max|k_j|): this problem is past the phase "
                f"transition of the polynomial method; use method='exact' (or method='auto')"
            )
        budget, base = target, best.approx_error
    for compute in (dtype, np.dtype(np.float64)):
        if base + best.rounding_error(compute) <= budget:
            return dataclasses.replace(best, budget=budget), compute
    raise ValueError(
        f"M = {bound:.3g} is too large for the degree-{best.degree} {best.family} polynomial: its terms "
        f"cancel by a factor {best.kappa:.2g}, so rounding alone (~{best.rounding_error(np.float64):.2g} "
        f"even in float64) would exceed the error budget {budget:.3g}; use method='exact'"
    )
