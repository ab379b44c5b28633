"""M: the World Models MDN-RNN, an LSTM that predicts the next latent as a Gaussian mixture, plus reward and done heads."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class MDNRNNConfig:
    """MDN-RNN hyperparameters; defaults are the paper's CarRacing ones (Doom: hidden 512)."""

    hidden_size: int = 256
    num_gaussians: int = 5
    seq_len: int = 999
    batch_size: int = 100
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    epochs: int = 20
    reward_weight: float = 1.0
    done_weight: float = 1.0
    done_pos_weight: float | None = None  # None: weight terminal steps by (#non-terminal / #terminal)
    scheduled_sampling: float = 0.0  # chance each input z_t (t > 0) is M's own draw instead of the data's (0: the paper)
    sample_latents: bool = True  # learn from draws of V's posterior, as the paper's code does; False: from V's means
    done_refit_epochs: int = 0  # then fit the done head alone on the frozen LSTM's whole-episode h (0: the paper)
    hit_weight: float = 0.0  # loss weight of a training-only head on h that predicts hits (game variables falling; 0: the paper)

    def __post_init__(self) -> None:
        if self.hit_weight < 0:
            raise ValueError(f"hit_weight weighs a loss: give 0 (no hit head) or more, not {self.hit_weight}")
        if not 0.0 <= self.scheduled_sampling <= 1.0:
            raise ValueError(f"scheduled_sampling is a probability in [0, 1], got {self.scheduled_sampling}")
        if self.done_refit_epochs < 0:
            raise ValueError(f"done_refit_epochs counts epochs: give 0 or more, not {self.done_refit_epochs}")


class MDNOutput(NamedTuple):
    """Per-step predictions of M: mixture over z_{t+1} (each (..., z_dim, K)), reward r_t, done logit."""

    logpi: torch.Tensor
    mu: torch.Tensor
    logsigma: torch.Tensor
    reward: torch.Tensor
    done_logit: torch.Tensor


class MDNRNN(nn.Module):
    """LSTM over [z_t, a_t]; its output h_{t+1} predicts z_{t+1} (MDN), reward r_t and done_t."""

    def __init__(self, z_dim: int, action_dim: int, hidden_size: int = 256, num_gaussians: int = 5) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.action_dim = action_dim
        self.hidden_size = hidden_size
        self.num_gaussians = num_gaussians
        self.lstm = nn.LSTM(z_dim + action_dim, hidden_size, batch_first=True)
        self.mdn = nn.Linear(hidden_size, 3 * num_gaussians * z_dim)
        self.reward_head = nn.Linear(hidden_size, 1)
        self.done_head = nn.Linear(hidden_size, 1)

    def heads(self, h: torch.Tensor) -> MDNOutput:
        """Predictions from LSTM outputs h of shape (..., hidden_size)."""
        out = self.mdn(h).view(*h.shape[:-1], self.z_dim, 3 * self.num_gaussians)
        logpi, mu, logsigma = out.split(self.num_gaussians, dim=-1)
        return MDNOutput(
            logpi=F.log_softmax(logpi, dim=-1),
            mu=mu,
            logsigma=logsigma.clamp(-8.0, 4.0),
            reward=self.reward_head(h).squeeze(-1),
            done_logit=self.done_head(h).squeeze(-1),
        )

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen inference weights: LSTM (z+a+h, 4H) with gates reordered (i, f, o, g), its bias, heads (H, out), bias.

        The heads' columns are the mixture (z_dim x 3K: logits, means, log-sigmas per dim), then reward, then done.
        """
        hidden = self.hidden_size
        order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden), torch.arange(2 * hidden, 3 * hidden)])
        lstm_weight = torch.cat([self.lstm.weight_ih_l0, self.lstm.weight_hh_l0], dim=1).detach()[order].t().contiguous()
        lstm_bias = (self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0).detach()[order].contiguous()
        head_weight = torch.cat([self.mdn.weight, self.reward_head.weight, self.done_head.weight]).detach().t().contiguous()
        head_bias = torch.cat([self.mdn.bias, self.reward_head.bias, self.done_head.bias]).detach()
        return lstm_weight, lstm_bias, head_weight, head_bias

    def forward(
        self, z: torch.Tensor, a: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[MDNOutput, tuple[torch.Tensor, torch.Tensor]]:
        """Sequences z (B, T, z_dim) and encoded actions a (B, T, action_dim) -> predictions, final state."""
        h, state = self.lstm(torch.cat([z, a], dim=-1), state)
        return self.heads(h), state

    def step(
        self, z: torch.Tensor, a: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tick for a batch: (z_t, a_t, h_t, c_t) -> (h_{t+1}, c_{t+1}), same weights as forward()."""
        return torch.lstm_cell(
            torch.cat([z, a], dim=-1),
            (h, c),
            self.lstm.weight_ih_l0,
            self.lstm.weight_hh_l0,
            self.lstm.bias_ih_l0,
            self.lstm.bias_hh_l0,
        )


def mdn_nll(out: MDNOutput, z_next: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of z_next (..., z_dim) under the mixture, per step averaged over z dims."""
    z = z_next.unsqueeze(-1)
    log_prob = -0.5 * ((z - out.mu) * torch.exp(-out.logsigma)).pow(2) - out.logsigma - LOG_SQRT_2PI
    return -torch.logsumexp(out.logpi + log_prob, dim=-1).mean(-1)


def sample_mdn(out: MDNOutput, temperature: float | torch.Tensor, uniform: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Draw z_{t+1} at temperature tau from given noise: softmax(logpi / tau) picks a component, sigma * sqrt(tau) scales it.

    uniform and normal are (..., z_dim) draws supplied by the caller, so every random number comes
    from the env's own seeded generator. temperature is a float or a (N,) tensor (one per env).
    The component is found by inverse CDF on unnormalised weights (no softmax call: on a loaded machine
    torch's softmax kernel can stall for milliseconds on tiny inputs).
    """
    if isinstance(temperature, torch.Tensor) and temperature.ndim > 0:
        tau = temperature.view(-1, *([1] * (out.mu.ndim - 1)))
        inv_tau, scale = 1.0 / tau.clamp(min=1e-4), tau.squeeze(-1).sqrt()
    else:
        tau = float(temperature)
        inv_tau, scale = 1.0 / max(tau, 1e-4), math.sqrt(tau)
    weights = ((out.logpi - out.logpi.amax(-1, keepdim=True)) * inv_tau).exp()
    cdf = weights.cumsum(-1)
    index = (uniform.unsqueeze(-1) * cdf[..., -1:] >= cdf).sum(-1, keepdim=True).clamp(max=out.mu.shape[-1] - 1)
    mu = out.mu.gather(-1, index).squeeze(-1)
    sigma = out.logsigma.gather(-1, index).squeeze(-1).exp()
    return mu + sigma * scale * normal
