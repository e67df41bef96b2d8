"""The reference sampler's numbers, checked against the values E2P-SPEC §1.7 tabulates (computed there by emulating
the official float32 arithmetic), and the update rule's dtype behaviour."""

import pytest
import torch

from e2p_core.errors import InputError
from e2p_core.schedule import euler_step, initial_noise, make_schedule

# E2P-SPEC §1.7: sigmas (before the terminal 0) and the bf16 timesteps the DiT sees.
SPEC_TABLE = {
    2: ([1.0, 0.008929], [1000, 8.9375]),
    4: ([1.0, 0.857692, 0.602151, 0.008929], [1000, 856, 604, 8.9375]),
    8: ([1.0, 0.947543, 0.882788, 0.800837, 0.693793, 0.548046, 0.337972, 0.008929],
        [1000, 948, 884, 800, 692, 548, 338, 8.9375]),
    10: ([1.0, 0.960129, 0.913349, 0.857692, 0.790368, 0.707278, 0.602151, 0.464876, 0.278049, 0.008929],
         [1000, 960, 912, 856, 792, 708, 604, 464, 278, 8.9375]),
}


@pytest.mark.parametrize("steps", sorted(SPEC_TABLE))
def test_multi_step_grid_matches_the_spec_table(steps):
    sigmas, bf16_timesteps = SPEC_TABLE[steps]
    schedule = make_schedule(steps)
    torch.testing.assert_close(schedule.sigmas[:-1], torch.tensor(sigmas), atol=1e-6, rtol=0)
    assert schedule.sigmas[-1] == 0  # multi-step runs end at sigma 0
    assert schedule.timesteps.to(torch.bfloat16).float().tolist() == bf16_timesteps


def test_one_step_is_the_reference_special_update():
    schedule = make_schedule(1)
    assert schedule.timesteps.tolist() == [1000.0]
    coefficient = (schedule.sigmas[1] - schedule.sigmas[0]).item()
    assert coefficient == pytest.approx(0.009 / 1.008 - 1, abs=1e-7)  # -0.99107143, not -1
    assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == (2,)


def test_update_promotes_bf16_to_float32():
    latent = torch.ones(1, 16, 2, 2, dtype=torch.bfloat16)
    velocity = torch.full((1, 16, 2, 2), 0.1, dtype=torch.bfloat16)
    schedule = make_schedule(1)
    out = euler_step(latent, velocity, schedule.sigmas[:1], schedule.sigmas[1:])
    assert out.dtype == torch.float32
    expected = 1.0 + velocity.float() * (schedule.sigmas[1] - schedule.sigmas[0])
    assert torch.equal(out, expected)


def test_noise_is_seeded_float32_randn():
    noise = initial_noise((6, 8), seed=42, device="cpu")
    expected = torch.randn((1, 16, 6, 8), generator=torch.Generator("cpu").manual_seed(42))
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    assert not torch.equal(noise, initial_noise((6, 8), seed=43, device="cpu"))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, "4"])
def test_bad_step_counts_are_rejected(steps):
    with pytest.raises(InputError, match="steps"):
        make_schedule(steps)
