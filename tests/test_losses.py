import pytest
import torch

from concept_erase.families.noising import add_noise, denoising_target
from concept_erase.methods.losses import negative_guidance_target, per_sample_mse


def test_per_sample_mse_is_fp32_mean_per_sample():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    out = per_sample_mse(pred, target)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([1.0, 1.0]))


def test_per_sample_mse_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        per_sample_mse(torch.zeros(2, 3), torch.zeros(3, 2))


def test_negative_guidance_target_formula():
    e0 = torch.tensor([1.0, 2.0])
    ec = torch.tensor([3.0, 0.0])
    # e0 - eta (ec - e0) with eta = 0.5: [1 - 1, 2 + 1]
    assert torch.equal(negative_guidance_target(e0, ec, 0.5), torch.tensor([0.0, 3.0]))
    assert torch.equal(negative_guidance_target(e0, ec, 0.0), e0)


def test_negative_guidance_commutes_with_v_parameterisation():
    """The target made in v space equals the target made in epsilon space, then mapped to v."""
    torch.manual_seed(0)
    x_t, e0, ec = torch.randn(3, 4)
    a = torch.tensor(0.3)

    def to_v(eps):  # v for a fixed x_t: x0 = (x_t - sqrt(1-a) eps) / sqrt(a); v = sqrt(a) eps - sqrt(1-a) x0
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    assert torch.allclose(negative_guidance_target(to_v(e0), to_v(ec), 1.0), to_v(negative_guidance_target(e0, ec, 1.0)),
                          atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_target_matches_diffusers(prediction_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type=prediction_type)
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, 4)[:2], torch.randn(2, 4, 4, 4)
    x0 = torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    a = sched.alphas_cumprod[t]
    expected = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    assert torch.allclose(denoising_target(prediction_type, x0, noise, a), expected, atol=1e-6)
    assert torch.allclose(add_noise(x0, noise, a), sched.add_noise(x0, noise, t), atol=1e-6)


def test_denoising_target_rejects_unknown_type():
    with pytest.raises(ValueError):
        denoising_target("flow", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1))


def test_flow_noising_and_velocity_target_match_diffusers_flow_matching():
    """(1 - s) x0 + s n, as FlowMatchEulerDiscreteScheduler.scale_noise gives it, and the velocity n - x0:
    the x0 a velocity model implies, x_s - s v, is the clean latent exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from concept_erase.families.noising import flow_noised, flow_target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 4, 8, 8), generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = sched.timesteps[torch.tensor([0, 400, 999])]
    sigma = t / 1000
    want = torch.stack([sched.scale_noise(x0[i:i + 1], t[i:i + 1], noise[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(flow_noised(x0, noise, sigma), want)
    v = flow_target(x0, noise)
    torch.testing.assert_close(flow_noised(x0, noise, sigma) - sigma.view(-1, 1, 1, 1) * v, x0, rtol=1e-5, atol=1e-5)


def test_negative_guidance_is_exact_in_velocity_space():
    """For a fixed x_s, v = n - x0 and x0 = x_s - s v are affine in each other: steering v0 - eta (vc - v0)
    is the same steering of the implied clean image."""
    g = torch.Generator().manual_seed(1)
    x_s, v0, vc = (torch.randn((2, 16), generator=g) for _ in range(3))
    s, eta = 0.7, 1.5
    x0 = lambda v: x_s - s * v  # noqa: E731
    torch.testing.assert_close(x0(negative_guidance_target(v0, vc, eta)), negative_guidance_target(x0(v0), x0(vc), eta))


def test_the_guidance_projection_is_one_for_the_original_and_minus_eta_at_the_target():
    from concept_erase.methods.losses import erasure_signal, guidance_projection, negative_guidance_target

    g = torch.Generator().manual_seed(0)
    e0, ec = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    direction = ec - e0
    assert erasure_signal(*guidance_projection(ec, e0, direction)) == pytest.approx(1.0, abs=1e-6)
    for eta in (0.5, 1.0, 3.0):
        target = negative_guidance_target(e0, ec, eta)
        assert erasure_signal(*guidance_projection(target, e0, direction)) == pytest.approx(-eta, abs=1e-5)
    # the reference prediction itself: no guidance toward the concept
    assert erasure_signal(*guidance_projection(e0, e0, direction)) == pytest.approx(0.0, abs=1e-6)
    # anything orthogonal to the concept direction leaves it unchanged
    other = torch.randn(3, 4, 8, 8, generator=g)
    flat = direction.flatten(1)
    orth = other - ((other.flatten(1) * flat).sum(1) / flat.pow(2).sum(1)).view(-1, 1, 1, 1) * direction
    assert erasure_signal(*guidance_projection(ec + orth, e0, direction)) == pytest.approx(1.0, abs=1e-5)


def test_the_signal_pools_samples_by_their_directions_strength_and_is_none_without_one():
    from concept_erase.methods.losses import erasure_signal, guidance_projection

    e0 = torch.zeros(2, 1, 2, 2)
    direction = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    pred = torch.stack([direction[0] * 1.0, direction[1] * 0.0])  # the weak sample still guides, the strong not
    along, norm_sq = guidance_projection(pred, e0, direction)
    assert along.tolist() == [4.0, 0.0] and norm_sq.tolist() == [4.0, 36.0]
    assert erasure_signal(along, norm_sq) == pytest.approx(4 / 40)
    assert erasure_signal(*guidance_projection(pred, e0, torch.zeros_like(pred))) is None
    with pytest.raises(ValueError, match="differ in shape"):
        guidance_projection(pred, e0, direction[:1])


def test_the_signal_meter_halves_the_gap_in_one_half_life_and_skips_steps_without_a_value():
    from concept_erase.methods.signal import SignalMeter

    meter = SignalMeter(half_life=4)
    assert meter.update(None) is None and meter.seen == 0
    assert meter.update(1.0) == 1.0
    for _ in range(4):
        meter.update(0.0)
    assert meter.value == pytest.approx(0.5)
    assert meter.update(None) == pytest.approx(0.5) and meter.update(float("nan")) == pytest.approx(0.5)
    again = SignalMeter(half_life=4)
    again.load_state_dict(meter.state_dict())
    assert again.update(0.0) == meter.update(0.0) and again.seen == meter.seen == 6
    with pytest.raises(ValueError):
        SignalMeter(0)


def test_a_held_erasure_counts_only_the_samples_still_guided_above_the_level():
    from concept_erase.methods.losses import still_guided

    along, norm_sq = torch.tensor([0.5, 0.1, -1.0, 0.0]), torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert still_guided(along, norm_sq, 0.2).tolist() == [True, False, False, False]
    assert still_guided(along, norm_sq, -0.6).tolist() == [True, True, True, False]  # -0.5 is above -0.6
