"""What the flow-matching families (SD3/SD3.5, FLUX.1) share: the rectified-flow forward process and its
velocity target, and the Flow-GRPO SDE step with its log-prob on the model's own flow schedule.

Papers: rectified flow, Liu et al., arXiv 2209.03003; SD3's flow schedule and its shift, Esser et al.,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", arXiv 2403.03206, sec. 2
and 5.3.2; the SDE step, Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv
2505.05470, eqs. (8)-(9) (reference: yifan123/flow_grpo, flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
``sde_step_with_logprob``).

The forward process (:class:`FlowSchedule`). The denoiser's timestep input is t = 1000 sigma, sigma in
(0, 1] (diffusers' ``FlowMatchEulerDiscreteScheduler``: ``timesteps = sigmas * num_train_timesteps``):

    x_t      = (1 - sigma) x0 + sigma eps              (add_noise)
    target   = v = eps - x0                            (target: the velocity dx_t / d sigma)
    x0_hat   = x_t - sigma v_hat,  x0_hat - x0 = -sigma (v_hat - v)   (x0_scale: k_t = sigma)

Training timesteps are drawn uniformly from the scheduler's N = num_train_timesteps training sigmas,
s_i = i / N (i = 1..N) moved by its shift S: sigma_i = S s_i / (1 + (S - 1) s_i) (SD3: S = 3; a shift
above 1 puts more of the training on the noisier half, as SD3's sampler does).

The SDE step (:func:`flow_sde_step_with_logprob`) from x_t at sigma to sigma' < sigma (dt = sigma' - sigma
< 0) with noise level a (``rollout.eta``; Flow-GRPO's ``noise_level``):

    s_t   = a sqrt(sigma / (1 - sigma~)),   sigma~ = sigma, or sigma_1 (the schedule's second sigma) at sigma = 1
    mu_t  = x_t (1 + s_t^2 dt / (2 sigma)) + v_hat (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
    std_t = s_t sqrt(-dt)
    x_t'  = mu_t + std_t z,   z ~ N(0, I)
    log pi(x_t' | x_t) = mean over C,H,W of [ -(x_t' - mu_t)^2 / (2 std_t^2) - log std_t - log sqrt(2 pi) ]

At a = 0 the mean is the Euler step x_t + v_hat dt of the probability-flow ODE (the stock sampler's);
the step's mean moves by k_t = (1 + s_t^2 (1 - sigma) / (2 sigma)) dt per unit of v_hat
(:func:`sde_step_coefficients`). As families/ddim.py does for DDIM, the log-prob is averaged over the
non-batch dims and computed for x_t' as returned (cast to the sample's dtype), so a recorded step scores
again to the same value.

Notation (code name -> symbol): model_output -> v_hat; sample -> x_t; prev_sample -> x_t'; mean -> mu_t;
std_dev -> std_t; eta -> a. Shapes: model_output, sample, prev_sample, noise (B, C, H, W); sigmas (B,) or
scalars; log_prob (B,); std_dev (B,).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from families.base import StepOutput
from families.loading import DiffusersFamily
from families.schedule import per_sample

__all__ = [
    "FlowFamily",
    "FlowSchedule",
    "flow_sde_step_with_logprob",
    "scheduler_sigmas",
    "sde_step_coefficients",
    "sde_std",
]


class FlowSchedule:
    """The rectified-flow forward process and velocity target of a flow-matching model.

    Args:
        sigmas: the N training sigmas (any order), float32, as the model's ``FlowMatchEulerDiscreteScheduler``
            gives them (with its shift).
        num_train_timesteps: N; the denoiser's timestep is N sigma.
    """

    prediction_type = "flow"

    def __init__(self, sigmas: Tensor, num_train_timesteps: int):
        self.sigmas = sigmas.float()
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_config(cls, scheduler_config: Any) -> "FlowSchedule":
        """From a pipeline's scheduler config (diffusers' ``FlowMatchEulerDiscreteScheduler`` computes the
        shifted training sigmas: one implementation of the shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        return cls(scheduler.sigmas, scheduler.config.num_train_timesteps)

    def draw_timesteps(self, count: int, generator: torch.Generator) -> Tensor:
        """t = N sigma_i, i ~ U{1..N}, (count,) float32."""
        i = torch.randint(0, self.sigmas.shape[0], (count,), generator=generator)
        return self.sigmas[i] * self.num_train_timesteps

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """sigma = t / N per sample in ``like``'s dtype, shaped to broadcast over it."""
        s = torch.as_tensor(t, device=like.device).double() / self.num_train_timesteps
        return per_sample(s.to(like.dtype).reshape(-1), like.ndim)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma eps (diffusers' ``scale_noise``)."""
        s = self.sigma(t, x0)
        return s * eps + (1.0 - s) * x0

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity v = eps - x0 (the same at every t)."""
        return eps - x0

    def x0_scale(self, t: Tensor, device: torch.device) -> Tensor:
        """k_t = sigma per sample (B,), float32: x0_hat - x0 = -sigma (v_hat - v)."""
        return (torch.as_tensor(t, device=device).double().reshape(-1) / self.num_train_timesteps).float()

    def flow_time(self, t: Tensor, device: torch.device) -> Tensor:
        """sigma per sample (B,), float32: x_t is on the flow path itself."""
        return self.x0_scale(t, device)

    def alpha_bar(self, t: Tensor, device: torch.device) -> Tensor:
        raise ValueError(
            "a flow-matching model has no DDPM alpha-bar (x_t = (1 - sigma) x0 + sigma eps): the method asking "
            "for it is eps-prediction specific"
        )


def sde_std(sigma: Tensor, sigma_next: Tensor, sigma_max: float, eta: float) -> tuple[Tensor, Tensor]:
    """(s_t, dt) of the SDE step from sigma to sigma_next, in the dtype of ``sigma`` (module docstring)."""
    dt = sigma_next - sigma
    s_t = eta * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_max, dtype=sigma.dtype), sigma)))
    return s_t, dt


def sde_step_coefficients(sigma: Tensor, sigma_next: Tensor, sigma_max: float, eta: float) -> tuple[Tensor, Tensor]:
    """(k_t, std_t), float64: the step's mean moves by k_t = (1 + s_t^2 (1 - sigma) / (2 sigma)) dt per unit of
    v_hat, and its standard deviation is std_t = s_t sqrt(-dt)."""
    sigma, sigma_next = torch.as_tensor(sigma).double(), torch.as_tensor(sigma_next).double()
    s_t, dt = sde_std(sigma, sigma_next, sigma_max, eta)
    return (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt, s_t * torch.sqrt(-dt)


def flow_sde_step_with_logprob(
    model_output: Tensor,
    sample: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    sigma_max: float,
    eta: float = 1.0,
    prev_sample: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepOutput:
    """One Flow-GRPO SDE step x_t -> x_t' with the log-prob of x_t'; a pure function of the sigmas.

    Pass ``prev_sample`` to score a recorded step; otherwise x_t' is drawn with ``noise`` (z) or fresh noise
    from ``generator``. The arithmetic is float32 (bf16 overflows in the mean), as flow_grpo's.

    Args:
        model_output: v_hat (B, C, H, W); the gradient flows through it into the mean and log_prob.
        sample: x_t (B, C, H, W).
        sigma, sigma_next: the step's sigmas, (B,) or scalars, 0 <= sigma_next < sigma <= 1.
        sigma_max: sigma~ at sigma = 1 (the schedule's second sigma, where s_t would be infinite).
        eta: the noise level a > 0.

    Raises:
        ValueError: on bad shapes, sigmas, eta or conflicting arguments.
    """
    if sample.ndim < 2 or model_output.shape != sample.shape:
        raise ValueError(
            f"model_output and sample must have one shape (B, C, H, W), got {tuple(model_output.shape)} "
            f"and {tuple(sample.shape)}"
        )
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta (the SDE noise level) must be finite and > 0 for a log-prob to exist, got {eta}")
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass either prev_sample (score a recorded step) or noise/generator (sample), not both")
    if noise is not None and generator is not None:
        raise ValueError("pass either noise or generator, not both")
    for name, x in (("prev_sample", prev_sample), ("noise", noise)):
        if x is not None and x.shape != sample.shape:
            raise ValueError(f"{name} must have shape {tuple(sample.shape)}, got {tuple(x.shape)}")
    b, ndim, device = sample.shape[0], sample.ndim, sample.device
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1).expand(b)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=device).reshape(-1).expand(b)
    if bool(((sigma_next < 0) | (sigma_next >= sigma) | (sigma > 1)).any()):
        raise ValueError(
            f"need 0 <= sigma' < sigma <= 1 (a denoising step), got {sigma.tolist()} -> {sigma_next.tolist()}"
        )
    s_t, dt = sde_std(sigma, sigma_next, sigma_max, eta)
    std_dev = s_t * torch.sqrt(-dt)  # (B,)
    s_, dt_, sig_, std_ = (per_sample(x, ndim) for x in (s_t, dt, sigma, std_dev))
    v, x = model_output.float(), sample.float()
    mean = x * (1 + s_**2 / (2 * sig_) * dt_) + v * (1 + s_**2 * (1 - sig_) / (2 * sig_)) * dt_
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = (mean + std_ * noise.float()).to(sample.dtype)
    x_prev = prev_sample.detach().float()
    log_prob = -((x_prev - mean) ** 2) / (2 * std_**2) - torch.log(std_) - math.log(math.sqrt(2 * math.pi))
    return StepOutput(prev_sample, log_prob.mean(dim=tuple(range(1, ndim))), mean, std_dev)


def scheduler_sigmas(scheduler: Any, timestep: Any, batch: int) -> tuple[Tensor, Tensor]:
    """(sigma, sigma') (B,) of the step from ``timestep`` (a float, or (B,), among ``scheduler.timesteps`` after
    ``set_timesteps``) to the next: found by value, so a step is scored without the scheduler's step counter."""
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(n) first")
    steps = scheduler.timesteps.detach().double().cpu()
    t = torch.as_tensor(timestep).detach().double().cpu().reshape(-1).expand(batch)
    gap, index = (steps[None, :] - t[:, None]).abs().min(dim=1)
    if bool((gap > 1e-3).any()):
        raise ValueError(f"timesteps {t.tolist()} are not among the sampler's {steps.tolist()}")
    sigmas = scheduler.sigmas.detach().float().cpu()
    return sigmas[index], sigmas[index + 1]


class FlowFamily(DiffusersFamily):
    """A pipeline whose denoiser predicts the flow velocity on a ``FlowMatchEulerDiscreteScheduler``
    schedule: :class:`FlowSchedule` for training, the Flow-GRPO SDE step for DDPO/GRPO.

    The sampler's scheduler is the pipeline's own: its deterministic steps are the stock Euler steps, and
    ``rollout.eta`` > 0 alone makes the recorded steps the SDE's (``rollout.scheduler=ddim`` is the UNets'
    DDIM and is refused)."""

    denoiser = "transformer"
    last_step_untrainable = (
        "the flow scheduler's last step starts at its smallest sigma (1/N shifted: 0.003 on SD3) and ends at 0, so "
        "its Jacobian sigma' - sigma (and ReFL's -sigma) is ~0 and the reward's gradient vanishes there; "
        "back-propagate through two or more steps (learner.draft.k >= 2, k_range up to >= 2) or a ReFL "
        "range ending before the last step"
    )

    def noise_schedule(self, scheduler_config: Any) -> FlowSchedule:
        return FlowSchedule.from_config(scheduler_config)

    def stochastic_scheduler(self, scheduler_config: Any) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def model_input(self, scheduler: Any, x: Tensor, t: Any) -> Tensor:
        return x  # the flow transformer reads x_t itself

    def renoise(self, scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """(1 - sigma) x0 + sigma noise at the scheduler's position (its ``scale_noise``, as diffusers' SD3
        img2img and inpainting pipelines noise)."""
        return scheduler.scale_noise(x0, t, noise)

    def sampler_scheduler(self, scheduler: Any, setting: str) -> Any:
        if setting != "default":
            raise ValueError(self.ddim_refusal(setting))
        return scheduler

    def ddim_refusal(self, setting: str) -> str:
        return (
            f"rollout.scheduler={setting} does not apply to the {self.name} model family: its sampler is the "
            f"pipeline's flow-matching Euler scheduler, made stochastic (the Flow-GRPO SDE step) by rollout.eta > 0 "
            f"alone; leave rollout.scheduler=default"
        )

    def logprob_sampler_problems(self, setting: str, eta: float, loss: str) -> list[str]:
        p = [] if setting == "default" else [self.ddim_refusal(setting)]
        if eta <= 0:
            p.append(
                f"learner.loss={loss} needs the stochastic (SDE) sampler with log-probs: set rollout.eta > 0 "
                f"(the SDE noise level; 1.0 here, Flow-GRPO uses 0.7); got eta={eta}"
            )
        return p

    def check_recordable(self, scheduler: Any, eta: float) -> None:
        if not (eta > 0 and type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"):
            raise ValueError(
                f"recording log-probs needs the flow-matching Euler scheduler and rollout.eta > 0 (the SDE noise "
                f"level); got {type(scheduler).__name__}, eta={eta}"
            )

    def step_kwargs(self, pipe: Any, generators: Any, eta: float) -> dict[str, Any]:
        return {}  # the Euler step draws nothing

    def deterministic_step(self, scheduler: Any, model_output: Tensor, t: Any, sample: Tensor) -> Tensor:
        """x + (sigma' - sigma) v_hat in float32, as the scheduler's ``step`` (without its step counter)."""
        sigma, sigma_next = scheduler_sigmas(scheduler, t, sample.shape[0])
        dt = per_sample((sigma_next - sigma).to(sample.device), sample.ndim)
        return (sample.float() + dt * model_output).to(model_output.dtype)

    def step_and_x0(self, scheduler: Any, model_output: Tensor, t: Any, sample: Tensor) -> tuple[Tensor, Tensor]:
        """The Euler step x_t + (sigma' - sigma) v_hat and x0_hat = x_t - sigma v_hat (x_t = (1 - sigma) x0 +
        sigma eps and v = eps - x0 give x0 = x_t - sigma v), float32, differentiable in v_hat."""
        sigma, sigma_next = scheduler_sigmas(scheduler, t, sample.shape[0])
        sig, sig_next = (per_sample(s.to(sample.device), sample.ndim) for s in (sigma, sigma_next))
        x, v = sample.float(), model_output.float()
        return x + (sig_next - sig) * v, x - sig * v

    def step_coefficients(self, scheduler: Any, t: Any, eta: float) -> tuple[Tensor, Tensor]:
        sigma, sigma_next = scheduler_sigmas(scheduler, t, 1)
        return tuple(c[0] for c in sde_step_coefficients(sigma, sigma_next, float(scheduler.sigmas[1]), eta))

    def step_with_logprob(self, scheduler, model_output, t, sample, eta, prev_sample=None, noise=None, generator=None):
        sigma, sigma_next = scheduler_sigmas(scheduler, t, sample.shape[0])
        return flow_sde_step_with_logprob(
            model_output,
            sample,
            sigma,
            sigma_next,
            sigma_max=float(scheduler.sigmas[1]),
            eta=eta,
            prev_sample=prev_sample,
            noise=noise,
            generator=generator,
        )
