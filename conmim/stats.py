"""Statistics of an ablation table: paired-by-seed differences against the baseline, Holm's
correction across the rows, and the minimum detectable effect of each row.

Pure functions of numbers (no I/O). Trials of a sweep with the same seed share the
initialisation and the data order, so a variant and the baseline are compared seed by seed:
Δ_s = variant_s − baseline_s, and the test is a one-sample (paired) Student t-test of the Δ_s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

ALPHA = 0.05   # two-sided
POWER = 0.80

NAN = float("nan")


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def t_quantile(q: float, dof: int) -> float:
    """The q quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(q, dof))


def mean_sd_ci(xs: Sequence[float], alpha: float = ALPHA) -> tuple[float, float, float]:
    """Mean, sample sd (n − 1) and the half-width of the two-sided (1 − alpha) Student-t CI of the
    mean, over the finite values of ``xs``; sd and half-width are NaN for fewer than two values."""
    xs = [float(x) for x in xs if _finite(x)]
    n = len(xs)
    if n == 0:
        return NAN, NAN, NAN
    m = sum(xs) / n
    if n == 1:
        return m, NAN, NAN
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd, t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)


def paired_differences(variant: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """Δ by seed, variant − baseline, for the seeds both have a finite value for (both finished),
    in ascending seed order."""
    return {s: float(variant[s]) - float(baseline[s]) for s in sorted(set(variant) & set(baseline))
            if _finite(variant[s]) and _finite(baseline[s])}


@dataclass(frozen=True)
class PairedTest:
    n: int              # pairs
    mean: float         # mean Δ
    sd: float           # sd of the Δ (n − 1)
    ci_low: float       # two-sided (1 − alpha) Student-t CI of the mean Δ, n − 1 dof
    ci_high: float
    t: float
    p: float            # two-sided paired t-test, H0: mean Δ = 0
    note: str = ""      # why CI/p are NaN, when they are

    @property
    def ci_includes_zero(self) -> bool:
        return not (_finite(self.ci_low) and _finite(self.ci_high)) or self.ci_low <= 0 <= self.ci_high


def paired_t(diffs: Sequence[float], alpha: float = ALPHA) -> PairedTest:
    """Paired t-test of differences (Student t, n − 1 dof), two-sided.

    n = 0: everything NaN. n = 1: Δ is reported, sd, CI and p are NaN (``note`` says so).
    The Δ all equal (sd = 0, e.g. an alias of the baseline): the t statistic is undefined, CI and p
    are NaN (``note`` says so)."""
    from scipy.stats import t as student_t
    ds = [float(d) for d in diffs if _finite(d)]
    n = len(ds)
    if n == 0:
        return PairedTest(0, NAN, NAN, NAN, NAN, NAN, NAN, "no paired seeds")
    m = sum(ds) / n
    if n == 1:
        return PairedTest(1, m, NAN, NAN, NAN, NAN, NAN, "n = 1 pair: no CI, no p-value")
    sd = math.sqrt(sum((d - m) ** 2 for d in ds) / (n - 1))
    if sd == 0:
        return PairedTest(n, m, 0.0, NAN, NAN, NAN, NAN, "Δ identical on every seed: no CI, no p-value")
    se = sd / math.sqrt(n)
    half = float(student_t.ppf(1 - alpha / 2, n - 1)) * se
    tstat = m / se
    p = float(2 * student_t.sf(abs(tstat), n - 1))
    return PairedTest(n, m, sd, m - half, m + half, tstat, min(1.0, p))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    Step-down: with the m finite p-values sorted p_(1) ≤ … ≤ p_(m), the adjusted value of p_(i) is
    max_{j ≤ i} min(1, (m − j + 1) · p_(j)) — monotone in the ranks and capped at 1. NaN p-values
    (rows without a test) stay NaN and do not count in m."""
    idx = sorted((i for i, p in enumerate(pvalues) if _finite(p)), key=lambda i: pvalues[i])
    m = len(idx)
    out = [NAN] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def paired_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test (level ``alpha``, n pairs) when the true mean Δ is
    ``effect`` and the differences have sd ``sd``: P(|T'| > t_{1−α/2, n−1}) with T' noncentral t,
    n − 1 dof, noncentrality effect·√n / sd."""
    from scipy.stats import nct, norm
    dof = n - 1
    crit = t_quantile(1 - alpha / 2, dof)
    nc = abs(effect) * math.sqrt(n) / sd
    upper = float(nct.sf(crit, dof, nc))
    lower = float(nct.cdf(-crit, dof, nc))
    if not math.isfinite(lower):
        # scipy's nct loses the far lower tail at large nc (dof 1-2): it is below P(T' < 0) = Φ(−nc)
        lower = float(norm.cdf(-nc))
    return upper + lower


def mde_paired(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a paired t-test: the smallest true |mean Δ| that the two-sided
    test at level ``alpha`` (default 0.05, NOT Holm-adjusted) detects with probability ``power``
    (default 0.80), for n pairs whose differences have sd ``sd`` (the observed sd of the Δ).

    Exact: solved on the noncentral t (``paired_power`` = power, Brent's method), not the normal
    approximation (t_{1−α/2,n−1} + t_{power,n−1})·sd/√n (``mde_paired_approx``), which it is close
    to. In the units of ``sd``. NaN when n < 2 or sd is 0 or not finite (no spread to size it by)."""
    if n < 2 or not _finite(sd) or sd <= 0:
        return NAN
    from scipy.optimize import brentq
    lo, hi = 0.0, mde_paired_approx(sd, n, alpha, power)
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda e: paired_power(e, sd, n, alpha) - power, lo, hi, xtol=1e-12 * sd, rtol=1e-12))


def mde_paired_approx(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The textbook approximation (t_{1−α/2,n−1} + t_{power,n−1})·sd/√n of ``mde_paired``."""
    if n < 2 or not _finite(sd) or sd <= 0:
        return NAN
    return (t_quantile(1 - alpha / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
