"""conmim.stats against numbers computed by hand (closed forms of Student's t with 1 and 2 degrees
of freedom, the Holm step-down by hand, the power of the t-test by direct integration)."""
import math

import pytest

from conmim import stats

NAN = float("nan")


# Student t with 2 dof has closed forms: P(T > t) = (1 - t / sqrt(2 + t²)) / 2 and the q quantile
# is (2q - 1) / sqrt(2 q (1 - q)); with 1 dof (Cauchy): P(|T| > t) = 1 - 2 atan(t) / π, quantile tan(π (q - 1/2)).
def p2(t):
    return 1 - abs(t) / math.sqrt(2 + t * t)


T975_2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)   # 4.302653
T975_1 = math.tan(math.pi * 0.475)                         # 12.706205


def test_closed_forms_are_the_table_values():
    # the hand formulas above are the printed table values (so the tests below rest on them)
    assert T975_2 == pytest.approx(4.302653, abs=1e-6) and T975_1 == pytest.approx(12.706205, abs=1e-6)
    assert stats.t_quantile(0.975, 2) == pytest.approx(T975_2, rel=1e-9)


def test_paired_differences_only_seeds_both_finished():
    variant = {0: 72.0, 1: 71.0, 2: 73.5, 4: NAN}
    baseline = {0: 71.0, 1: 69.0, 2: 69.5, 3: 70.0, 4: 70.0}
    assert stats.paired_differences(variant, baseline) == {0: 1.0, 1: 2.0, 2: 4.0}


def test_paired_t_three_pairs_by_hand():
    # Δ = 1, 2, 4: mean 7/3; squared deviations (16 + 1 + 25)/9 = 42/9, / (n-1) = 7/3 -> sd = sqrt(7/3);
    # se = sd / sqrt(3) = sqrt(7)/3, t = (7/3) / (sqrt(7)/3) = sqrt(7), p = 1 - sqrt(7)/3 (2 dof)
    r = stats.paired_t([1.0, 2.0, 4.0])
    assert r.n == 3 and r.note == ""
    assert r.mean == pytest.approx(2.333333, abs=1e-6)
    assert r.sd == pytest.approx(1.527525, abs=1e-6)
    assert r.t == pytest.approx(2.645751, abs=1e-6)
    assert r.p == pytest.approx(0.118083, abs=1e-6) and r.p == pytest.approx(1 - math.sqrt(7) / 3, rel=1e-9)
    # 95 % CI: 7/3 ± 4.302653 · sqrt(7)/3 = 7/3 ± 3.794583
    assert r.ci_low == pytest.approx(-1.461250, abs=1e-6) and r.ci_high == pytest.approx(6.127916, abs=1e-6)
    assert r.ci_includes_zero


def test_paired_t_negative_effect_by_hand():
    # Δ = -3, -3.5, -2.5: mean -3, sd = sqrt((0 + .25 + .25)/2) = 0.5, se = 0.5/sqrt(3), t = -6 sqrt(3)
    r = stats.paired_t([-3.0, -3.5, -2.5])
    assert r.sd == pytest.approx(0.5) and r.t == pytest.approx(-10.392305, abs=1e-6)
    assert r.p == pytest.approx(p2(-6 * math.sqrt(3)), rel=1e-9) and r.p == pytest.approx(0.009133, abs=1e-6)
    assert (r.ci_low, r.ci_high) == (pytest.approx(-4.242069, abs=1e-6), pytest.approx(-1.757931, abs=1e-6))
    assert not r.ci_includes_zero


def test_paired_t_two_pairs_by_hand():
    # Δ = 0.5, 1.5: mean 1, sd sqrt(0.5), se 0.5, t = 2, 1 dof: p = 1 - 2 atan(2)/π, CI 1 ± 12.706205 · 0.5
    r = stats.paired_t([0.5, 1.5])
    assert r.p == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-9) and r.p == pytest.approx(0.295167, abs=1e-6)
    assert r.ci_low == pytest.approx(1 - T975_1 * 0.5, rel=1e-9) and r.ci_high == pytest.approx(7.353102, abs=1e-6)


def test_one_pair_reports_delta_without_ci_or_p():
    r = stats.paired_t([-0.75])
    assert r.n == 1 and r.mean == -0.75
    assert math.isnan(r.sd) and math.isnan(r.ci_low) and math.isnan(r.ci_high) and math.isnan(r.p)
    assert "n = 1" in r.note and "no CI" in r.note and "no p-value" in r.note


def test_no_pairs_and_identical_differences():
    assert stats.paired_t([]).n == 0 and math.isnan(stats.paired_t([NAN]).mean)
    r = stats.paired_t([0.0, 0.0, 0.0])  # an alias of the baseline: sd 0, no t
    assert r.mean == 0 and r.sd == 0 and math.isnan(r.p) and math.isnan(r.ci_low) and "identical" in r.note


def test_holm_by_hand():
    # sorted .01, .03, .04, .2 (m = 4, the NaN is not a test): .04, .09, max(.09, .08) = .09, max(.09, .2) = .2
    assert stats.holm([0.01, 0.04, NAN, 0.03, 0.2]) == pytest.approx([0.04, 0.09, NAN, 0.09, 0.2], nan_ok=True)
    # monotone: .02·3 = .06, .3·2 = .6, .5·1 = .5 -> raised to .6
    assert stats.holm([0.5, 0.3, 0.02]) == pytest.approx([0.6, 0.6, 0.06])
    # capped at 1
    assert stats.holm([0.7, 0.9]) == [1.0, 1.0]
    assert stats.holm([0.04]) == [0.04] and stats.holm([]) == [] and math.isnan(stats.holm([NAN])[0])


def _power_by_integration(effect, sd, n, crit):
    """Power of the two-sided paired t-test written out from its definition, independent of
    scipy's noncentral t: T' = (Z + λ) / sqrt(V/ν), Z standard normal, V χ²(ν), λ = effect·√n/sd;
    P(|T'| > c) = E_V[Φ(-c·sqrt(V/ν) + λ) + Φ(-c·sqrt(V/ν) - λ)]."""
    from scipy.integrate import quad
    nu, lam = n - 1, effect * math.sqrt(n) / sd
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    chi2 = lambda v: v ** (nu / 2 - 1) * math.exp(-v / 2) / (2 ** (nu / 2) * math.gamma(nu / 2))  # noqa: E731
    f = lambda v: (phi(-crit * math.sqrt(v / nu) + lam) + phi(-crit * math.sqrt(v / nu) - lam)) * chi2(v)  # noqa: E731
    return quad(f, 0, math.inf, limit=200)[0]


@pytest.mark.parametrize("n,crit", [(3, T975_2), (10, 2.262157)])  # t_.975 with 2 and 9 dof (tables)
def test_mde_has_80_percent_power_by_direct_integration(n, crit):
    sd = 1.3
    mde = stats.mde_paired(sd, n)
    assert _power_by_integration(mde, sd, n, crit) == pytest.approx(0.80, abs=1e-4)
    assert _power_by_integration(0.9 * mde, sd, n, crit) < 0.78  # and not more than needed
    # close to the textbook approximation (t_.975 + t_.80)·sd/√n, above it at small n
    approx = stats.mde_paired_approx(sd, n)
    assert approx <= mde <= 1.06 * approx


def test_mde_by_hand_at_three_pairs():
    # the effect with 80 % power at n = 3, sd = 1 (power 0.80 there by the integral above)
    assert stats.mde_paired(1.0, 3) == pytest.approx(3.264044, abs=1e-5)
    assert _power_by_integration(3.264044, 1.0, 3, T975_2) == pytest.approx(0.80, abs=1e-5)


def test_mde_monotone_in_sd_and_n():
    by_sd = [stats.mde_paired(sd, 5) for sd in (0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(by_sd, by_sd[1:]))
    assert by_sd[3] == pytest.approx(2 * by_sd[2], rel=1e-8)  # in the units of sd
    by_n = [stats.mde_paired(1.0, n) for n in (2, 3, 4, 5, 10, 30, 100)]
    assert all(a > b for a, b in zip(by_n, by_n[1:]))
    assert by_n[-1] == pytest.approx((1.959964 + 0.841621) / 10, rel=0.01)  # → the normal formula as n grows


def test_mde_undefined_without_spread_or_pairs():
    assert math.isnan(stats.mde_paired(0.0, 5)) and math.isnan(stats.mde_paired(1.0, 1))
    assert math.isnan(stats.mde_paired(NAN, 5)) and math.isnan(stats.mde_paired(1.0, 0))


def test_mean_sd_ci_by_hand():
    m, sd, half = stats.mean_sd_ci([71.0, 69.0, 69.5, NAN])
    # mean 69.8333; deviations 1.1667, -0.8333, -0.3333: squares 1.36111 + 0.69444 + 0.11111 = 2.16667, /2 -> sd 1.040833
    assert m == pytest.approx(69.833333, abs=1e-6) and sd == pytest.approx(1.040833, abs=1e-6)
    assert half == pytest.approx(T975_2 * 1.040833 / math.sqrt(3), abs=1e-5)
    assert stats.mean_sd_ci([5.0])[0] == 5.0 and math.isnan(stats.mean_sd_ci([5.0])[1])
