"""The flip probability: the posterior of a symmetric two-component mixture fitted, without labels,
to the stack's cross-fitted margins (scoring.flip_posterior), and that the stack, evaluate and the report use it."""

from __future__ import annotations

import math

import pytest
import torch

from safer_audit.scoring.posterior import fit_flip_mixture, flip_posterior
from safer_audit.scoring.stack import stack_judges
from safer_audit.workflows.evaluate import calibration, flip_calibration


def mixture_margins(n: int, rate: float, separation: float, seed: int, distort=lambda m: m):
    """Margins from the model itself: correct pairs N(s, 1), flipped ones N(-s, 1), on a scale ``distort``."""
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.rand(n, generator=generator) < rate
    m = torch.randn(n, generator=generator, dtype=torch.float64) + separation
    m[flipped] = -m[flipped]
    return distort(m), flipped


@pytest.mark.parametrize("rate", [0.1, 0.3])
@pytest.mark.parametrize("separation", [1.0, 2.0])
def test_the_mixture_recovers_the_flip_rate_and_its_posterior_is_calibrated(rate, separation):
    # on a bounded, non-Gaussian scale (tanh): the fit reads only the margins' ranks and signs
    margins, flipped = mixture_margins(4000, rate, separation, seed=round(100 * rate + 10 * separation),
                                       distort=lambda m: torch.tanh(m / 2))
    posterior, mixture = flip_posterior(margins)
    assert mixture.rate == pytest.approx(rate, abs=0.035)
    figures = calibration(posterior, flipped)
    assert figures["mean_predicted"] == pytest.approx(rate, abs=0.035)
    assert figures["ece"] < 0.05
    # the stack's old flip probability, sigmoid(-margin), is far from calibrated on the same margins
    assert calibration(torch.sigmoid(-margins), flipped)["ece"] > 0.1


def test_no_flips_gives_a_rate_near_zero_and_every_pair_the_other_way_no_probability():
    margins, _ = mixture_margins(4000, 0.0, 1.0, seed=3)
    posterior, mixture = flip_posterior(margins)
    assert mixture.rate < 0.02 and mixture.identified
    assert float(posterior.min()) > 0  # few flips is not no flips: no pair at exactly 0
    # every pair the other way round: the fit cannot call most pairs flipped (pi <= 1/2), and the judges are surer
    # where they disagree with the labels, which no mixture of flips explains
    _, mixture = flip_posterior(-margins)
    assert mixture.rate > 0.4 and not mixture.identified and mixture.size_sign_z < 0


def test_the_posterior_is_decreasing_in_the_margin_deterministic_and_order_free():
    margins, _ = mixture_margins(1500, 0.15, 1.0, seed=4)
    posterior, mixture = flip_posterior(margins)
    order = torch.argsort(margins)
    assert bool((posterior[order][1:] <= posterior[order][:-1]).all())
    assert float(posterior[margins.argmin()]) > 0.9 > 0.01 > float(posterior[margins.argmax()])
    again, same = flip_posterior(margins.clone())
    assert torch.equal(posterior, again) and same == mixture
    shuffle = torch.randperm(len(margins), generator=torch.Generator().manual_seed(0))
    shuffled, moved = flip_posterior(margins[shuffle])
    assert torch.allclose(shuffled, posterior[shuffle], atol=1e-12) and moved.rate == pytest.approx(mixture.rate)
    # an increasing odd rescaling of the margins changes nothing
    scaled, rescaled = flip_posterior(margins.pow(3) * 7)
    assert torch.allclose(scaled, posterior, atol=1e-9) and rescaled.rate == pytest.approx(mixture.rate)


def test_zero_and_missing_margins_carry_no_sign():
    margins = torch.tensor([0.0, float("nan"), 0.0])
    posterior, mixture = flip_posterior(margins)
    assert mixture.rate == 0 and torch.equal(posterior, torch.zeros(3, dtype=torch.float64))
    assert not mixture.identified and "no pair has a margin with a sign" in mixture.reason
    mixed, _ = mixture_margins(800, 0.2, 1.5, seed=5)
    mixed[:50] = 0.0
    posterior, mixture = flip_posterior(mixed)
    assert torch.allclose(posterior[:50], torch.full((50,), mixture.rate, dtype=torch.float64))
    fitted, again = fit_flip_mixture(mixed)
    assert fitted == mixture and torch.equal(again, posterior)
    assert mixture.agreeing + mixture.disagreeing == len(mixed) - 50


def test_the_stack_carries_the_posterior_and_the_old_probability_beside_it():
    generator = torch.Generator().manual_seed(6)
    n = 1200
    flipped = torch.rand(n, generator=generator) < 0.2
    truth = torch.randn(n, generator=generator) + 1.5
    signals = {"a": truth + 0.5 * torch.randn(n, generator=generator),
               "b": truth + 0.5 * torch.randn(n, generator=generator)}
    signals = {name: torch.where(flipped, -values, values) for name, values in signals.items()}
    stack = stack_judges(signals, folds=5, seed=0)
    posterior, mixture = flip_posterior(stack.margin)
    assert torch.equal(stack.flip_probability, posterior) and stack.mixture == mixture
    assert torch.allclose(stack.rejected_probability, torch.sigmoid(-stack.margin))
    figures = flip_calibration(stack.flip_probability, stack, flipped)
    assert figures["estimated_rate"] == mixture.rate
    assert figures["ece"] < figures["rejected_ece"]
    assert math.isclose(figures["mean_predicted"], float(posterior.mean()))


def test_a_warm_scan_reads_the_posterior_back_instead_of_fitting_it_again(tmp_path, monkeypatch):
    from safer_audit.scoring import heads as scoring

    margins, _ = mixture_margins(500, 0.2, 1.5, seed=7)
    cache = scoring.HeadCache(tmp_path / "heads")
    first, mixture = cache.flip_posterior(margins)
    fits = []
    monkeypatch.setattr(scoring, "flip_posterior", lambda m: fits.append(m) or flip_posterior(m))
    again, same = cache.flip_posterior(margins.clone())
    assert fits == [] and torch.equal(again, first) and same == mixture  # read back, bit for bit
    cache.flip_posterior(margins[:-1])  # other margins: fitted
    assert len(fits) == 1
    for entry in (tmp_path / "heads").glob("*posterior*"):
        entry.write_bytes(entry.read_bytes()[:40])  # a damaged entry is fitted again, not trusted
    assert torch.equal(cache.flip_posterior(margins)[0], first) and len(fits) == 2


def rounded(posterior: torch.Tensor) -> torch.Tensor:
    return posterior.mul(1e6).round().div(1e6)  # as a finding carries it


@pytest.mark.parametrize("n, rate", [(300, 0.0), (300, 0.03), (2000, 0.01)])
def test_small_data_and_few_flips_pile_no_pair_at_exactly_0_or_1(n, rate):
    # the maximum-likelihood fit put the rate at exactly 0 here, and every pair's probability with it
    margins, flipped = mixture_margins(n, rate, 0.8, seed=n + round(1000 * rate))
    posterior, mixture = flip_posterior(margins)
    assert mixture.identified
    shown = rounded(posterior)
    assert bool((shown > 0).all()) and bool((shown < 1).all())
    assert 0 < mixture.rate < 0.1 and mixture.rate_sd > 0
    assert float(posterior.mean()) == pytest.approx(mixture.rate, abs=0.01)


def test_judges_no_surer_where_they_agree_give_no_probability_and_say_why():
    # signs that do not depend on the sizes: the maximum-likelihood fit took every disagreeing pair for a flip,
    # with probability exactly 1 (as on the 300-pair sample)
    generator = torch.Generator().manual_seed(8)
    sizes = torch.rand(300, generator=generator, dtype=torch.float64) * 3
    margins = torch.where(torch.rand(300, generator=generator) < 0.2, -sizes, sizes)
    posterior, mixture = flip_posterior(margins)
    assert not mixture.identified and abs(mixture.size_sign_z) < 3
    assert mixture.reason.startswith("no flip probability: the judges are too weak") and "\n" not in mixture.reason
    assert posterior.shape == margins.shape  # evaluate still measures it against planted flips


def test_a_few_hundred_pairs_from_the_mixture_are_identified_and_roughly_calibrated():
    margins, flipped = mixture_margins(500, 0.15, 1.5, seed=9)
    posterior, mixture = flip_posterior(margins)
    assert mixture.identified and mixture.rate == pytest.approx(0.15, abs=0.05)
    assert calibration(posterior, flipped)["ece"] < 0.06
    shown = rounded(posterior)
    assert int((shown == 0).sum()) == 0 and int((shown == 1).sum()) == 0
