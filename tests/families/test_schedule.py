"""families/schedule.py: the DDPM forward process equals diffusers' DDPMScheduler bit for bit, and
the x0 scale is the one x0_hat - x0 = -k_t (pred - target) needs."""

import pytest
import torch
from diffusers import DDPMScheduler

from families.schedule import DDPMSchedule

CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SDXL's


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noising_and_target_equal_diffusers(prediction_type):
    ddpm = DDPMScheduler(**CONFIG, prediction_type=prediction_type)
    ours = DDPMSchedule.from_config(ddpm.config)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999])
    assert ours.num_train_timesteps == 1000 and ours.prediction_type == prediction_type
    assert torch.equal(ours.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t))
    want = eps if prediction_type == "epsilon" else ddpm.get_velocity(x0, eps, t)
    assert torch.equal(ours.target(x0, eps, t), want)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_scale_maps_the_prediction_error_to_the_x0_error(prediction_type):
    ours = DDPMSchedule.from_config(DDPMScheduler(**CONFIG, prediction_type=prediction_type).config)
    g = torch.Generator().manual_seed(1)
    x0, eps, err = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([20, 800])
    abar = ours.alpha_bar(t, torch.device("cpu")).double().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = ours.target(x0, eps, t) + err
    if prediction_type == "epsilon":
        x0_hat = (x_t - (1 - abar).sqrt() * pred) / abar.sqrt()
    else:
        x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * pred
    k = ours.x0_scale(t, torch.device("cpu")).double().view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_hat - x0, -k * err, rtol=1e-5, atol=1e-6)


def test_unsupported_prediction_types_are_refused():
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        DDPMSchedule(torch.linspace(0.99, 0.01, 10), "sample")
