"""Discrete variance-preserving noise schedules.

A schedule is nothing but the table ``abar_t = prod_{i<=t} (1 - beta_i)`` for t = 0..T-1, with the
forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. Everything else (betas, SNR,
per-sample coefficients) is derived from that one table, so a schedule cannot disagree with itself.

The table is kept in float64 on the CPU: in float32, ``1 - abar_t`` near t = 0 and ``abar_t`` near
t = T-1 lose most of their digits, and those are exactly the values samplers divide by. Callers get
float32 (or whatever they ask for) copies on their own device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("cosine", "linear")


def broadcast_to(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample vector ``[B]`` to ``[B, 1, ..., 1]`` with ``ndim`` dimensions.

    Per-sample coefficients must multiply latents of any spatial rank (2D ``[B, C, H, W]`` and 3D
    ``[B, C, D, H, W]``); trailing singleton axes make plain broadcasting do that without the
    caller writing ``[:, None, None, None]`` for one rank and forgetting the other.
    """
    if x.ndim != 1:
        raise ValueError(f"broadcast_to expects a 1-D per-sample tensor, got shape {tuple(x.shape)}")
    if ndim < 1:
        raise ValueError(f"ndim must be >= 1, got {ndim}")
    return x.reshape(x.shape[0], *([1] * (ndim - 1)))


def inference_timesteps(T: int, num_steps: int) -> list[int]:
    """Descending timesteps for a ``num_steps``-step sampler over a ``T``-step schedule.

    Uses "trailing" spacing (Lin et al. 2024, "Common diffusion noise schedules and sample steps
    are flawed"): ``t_i = T - 1 - floor(i * T / num_steps)``. The first step is always ``T - 1``,
    the noisiest timestep the model was trained on, so a sampler started from pure N(0, I) noise
    is asked a question the model has seen, and a one-step sampler (``[T - 1]``) is meaningful.
    "Leading" spacing (``0, k, 2k, ...`` reversed) would start at ``T - k`` and hand the model a
    pure-noise input labelled as a partially noised one. The last step is ``T/num_steps - 1``
    (``0`` when ``num_steps == T``); samplers return their x0 prediction from it. Integer
    arithmetic keeps the list exact and reproducible across platforms.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, T={T}], got {num_steps}")
    return [T - 1 - (i * T) // num_steps for i in range(num_steps)]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Cumulative signal fractions ``abar_t`` for discrete timesteps ``0..T-1`` (float64, CPU)."""

    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        abar = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).detach().cpu().clone()
        if abar.ndim != 1 or abar.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(abar.shape)}")
        # abar = 0 makes eps-prediction undefined and abar = 1 makes x0-prediction undefined.
        if not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        if abar.numel() > 1 and not bool((abar[1:] <= abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing (noise only ever grows with t)")
        object.__setattr__(self, "alphas_cumprod", abar)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def cosine(cls, T: int, s: float = 0.008) -> NoiseSchedule:
        """Nichol & Dhariwal (2021) cosine schedule, betas clipped at 0.999.

        The offset ``s`` keeps beta_0 from being vanishingly small; the clip keeps the last step
        from having beta = 1, which would make abar exactly 0 and x0 unrecoverable from x_{T-1}.
        """
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        steps = torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos(((steps / T) + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(min=0.0, max=0.999)
        return cls(torch.cumprod(1 - betas, dim=0))

    @classmethod
    def linear(cls, T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> NoiseSchedule:
        """Ho et al. (2020) linear-beta schedule.

        The betas are taken literally (not rescaled by 1000/T), so the defaults only reach
        near-zero terminal SNR for T around 1000; check ``snr`` at T-1 before using a short one.
        """
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, dim=0))

    @classmethod
    def from_name(cls, name: str, T: int) -> NoiseSchedule:
        """Build a schedule from the name stored in a plan, so plans stay plain JSON."""
        if name == "cosine":
            return cls.cosine(T)
        if name == "linear":
            return cls.linear(T)
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULE_NAMES}")

    @classmethod
    def from_plan(cls, diffusion: dict) -> NoiseSchedule:
        """The schedule of a plan's (or checkpoint's) ``diffusion`` settings. Here, below training and
        inference, so both build it the same way without one importing the other."""
        return cls.from_name(diffusion["schedule"], int(diffusion["training_steps"]))

    # ----------------------------------------------------------------- derived tables
    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def __len__(self) -> int:
        return self.num_timesteps

    @property
    def betas(self) -> torch.Tensor:
        """Per-step betas recovered from abar (float64); the DDPM posterior needs them."""
        abar = self.alphas_cumprod
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return 1 - abar / prev

    # ----------------------------------------------------------------- per-sample lookups
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """abar at integer timesteps ``t`` (shape [B]), float64 on the CPU.

        The lookup happens on the CPU so that float64 never has to exist on devices without it.
        """
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"timesteps must have shape [B], got {tuple(t.shape)}")
        t_cpu = t.detach().cpu().long()
        if t_cpu.numel() and (int(t_cpu.min()) < 0 or int(t_cpu.max()) >= self.num_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], "
                f"got range [{int(t_cpu.min())}, {int(t_cpu.max())}]"
            )
        return self.alphas_cumprod[t_cpu]

    def alpha_sigma(
        self, t: torch.Tensor, ndim: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` per sample, on ``t``'s device.

        With ``ndim`` the results are shaped ``[B, 1, ..., 1]`` so they broadcast against a latent
        of that rank; without it they stay ``[B]``. Square roots are taken in float64 before the
        cast, so sigma near t = 0 keeps its leading digits.
        """
        abar = self._gather(t)
        alpha = abar.sqrt().to(dtype=dtype, device=t.device)
        sigma = (1 - abar).sqrt().to(dtype=dtype, device=t.device)
        if ndim is not None:
            alpha, sigma = broadcast_to(alpha, ndim), broadcast_to(sigma, ndim)
        return alpha, sigma

    def snr(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` per sample (shape [B]), for loss weighting."""
        abar = self._gather(t)
        return (abar / (1 - abar)).to(dtype=dtype, device=t.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) with the caller's noise, so the training loss can reuse it."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if t.ndim != 1 or t.shape[0] != x0.shape[0]:
            raise ValueError(f"timesteps shape {tuple(t.shape)} does not match batch size {x0.shape[0]}")
        alpha, sigma = self.alpha_sigma(t, ndim=x0.ndim, dtype=x0.dtype)
        return alpha.to(x0.device) * x0 + sigma.to(x0.device) * noise

    def posterior_coefficients(
        self, t: torch.Tensor, s: torch.Tensor, ndim: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_x0, c_xt, std)`` of q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, std^2), for s < t.

        The DDPM posterior for a jump of any length (s = t - 1 is Ho et al.'s), as DDGAN uses it for
        its few large steps: with ``abar_{t|s} = abar_t / abar_s``,
        ``c_x0 = sqrt(abar_s) (1 - abar_{t|s}) / (1 - abar_t)``,
        ``c_xt = sqrt(abar_{t|s}) (1 - abar_s) / (1 - abar_t)`` and
        ``std^2 = (1 - abar_{t|s}) (1 - abar_s) / (1 - abar_t)``. ``s = -1`` stands for x0 itself
        (abar = 1), where the posterior collapses to ``x0``: (1, 0, 0). Computed in float64 on the
        CPU like every lookup here; returned on ``t``'s device, shaped like :meth:`alpha_sigma`.
        """
        abar_t = self._gather(t)
        s = torch.as_tensor(s).detach().cpu().long()
        if s.shape != t.shape or bool((s >= t.detach().cpu().long()).any()) or bool((s < -1).any()):
            raise ValueError("s must have t's shape and satisfy -1 <= s < t")
        abar_s = torch.where(s >= 0, self.alphas_cumprod[s.clamp_min(0)], torch.ones((), dtype=torch.float64))
        ratio = abar_t / abar_s
        c_x0 = abar_s.sqrt() * (1 - ratio) / (1 - abar_t)
        c_xt = ratio.sqrt() * (1 - abar_s) / (1 - abar_t)
        std = ((1 - ratio) * (1 - abar_s) / (1 - abar_t)).clamp_min(0).sqrt()
        out = tuple(v.to(dtype=dtype, device=t.device) for v in (c_x0, c_xt, std))
        if ndim is not None:
            out = tuple(broadcast_to(v, ndim) for v in out)
        return out

    def posterior_sample(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Draw x_s ~ q(x_s | x_t, x0) with the caller's noise (see :meth:`posterior_coefficients`).

        With a predicted x0 this is DDGAN's generator step (and DDIM's with eta = 1); with the true
        x0 it is the real sample the discriminator compares it with. Host lookups only: ``t`` and
        ``s`` may live on the CPU while the latents are on an accelerator.
        """
        c_x0, c_xt, std = (v.to(x0.device, non_blocking=True) for v in self.posterior_coefficients(t, s, x0.ndim, x0.dtype))
        return c_x0 * x0 + c_xt * x_t + std * noise
