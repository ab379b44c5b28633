"""The RSSM: DreamerV3's recurrent state-space model (GRU state + categorical latents), with a conv image
encoder/decoder (or a trained World Models V), a reward head and a continue head. It plays M's role (and V's)
behind the same envs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dreamenv.config import config_from_table
from dreamenv.models.vae import ConvVAE


@dataclass
class RSSMConfig:
    """RSSM hyperparameters: DreamerV3's XS model (GRU 256, MLPs 256 of one layer, 32 x 32 categorical latents,
    batches of 16 x 64 steps, Adam 1e-4, KL free bits 1, dyn 0.5 / rep 0.1, unimix 1%) with the CNN narrowed
    from depth 24 to 16 so that training fits a 2-core CPU."""

    deter: int = 256  # GRU (deterministic state) size
    hidden: int = 256  # width of the MLP layers
    stoch: int = 32  # number of categorical latents
    classes: int = 32  # classes per latent
    cnn_depth: int = 16  # channels of the first conv; the encoder doubles them at each of 4 stride-2 convs
    mlp_layers: int = 1  # hidden layers of the reward and continue heads
    unimix: float = 0.01  # mix 1% uniform into every categorical (no probability is ever 0)
    free_nats: float = 1.0  # KL below this (per step, summed over latents) is not penalised
    dyn_scale: float = 0.5  # weight of KL[sg(posterior) || prior]: trains the prior
    rep_scale: float = 0.1  # weight of KL[posterior || sg(prior)]: regularises the posterior
    # weight of terminal steps in the continue loss: 1 as in DreamerV3; more for rare deaths (the trained head is then
    # shifted back by log(weight), so p(continue) stays calibrated); "balanced" = #non-terminal / #terminal steps
    terminal_weight: float | str = 1.0
    # what the continue head reads: "feature" = [h, z] as DreamerV3; "deter" = h alone, like the MDN-RNN's done head.
    # A store has no frame after an episode's last step, so there (and only there) z is the prior's: a head on [h, z]
    # could learn that difference instead of the danger
    continue_input: str = "feature"
    # epochs of a second stage that trains the continue head alone on the trained model's h after every step of
    # whole training episodes (filtered as RealEnv does), the rest frozen, with the same terminal weight. Trained
    # jointly, its loss (about 0.01 a step) is a speck beside the image loss (about 30), and the head stays far from
    # what h can tell it. 0 = DreamerV3's joint training alone. Needs continue_input "deter"
    continue_refit_epochs: int = 0
    # 0: the RSSM's own conv encoder and decoder (DreamerV3). n > 0: frames are seen through a trained, frozen World
    # Models V with z of size n (`dreamenv train --model rssm --vae-from BUNDLE` sets it): the posterior reads V's mean
    # z, an MLP decoder predicts it and V's decoder draws it, so the RSSM learns the dynamics alone, as M does
    vae_z_dim: int = 0
    seq_len: int = 64
    batch_size: int = 16
    learning_rate: float = 1e-4
    adam_eps: float = 1e-8
    grad_clip: float = 1000.0
    epochs: int = 20

    def __post_init__(self) -> None:
        for name in ("deter", "hidden", "stoch", "classes", "cnn_depth", "seq_len", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RSSMConfig.{name} must be a positive integer, got {value!r}")
        if self.classes < 2:
            raise ValueError(f"RSSMConfig.classes must be at least 2 (a categorical of one class is constant), got {self.classes}")
        if not isinstance(self.mlp_layers, int) or self.mlp_layers < 0:
            raise ValueError(f"RSSMConfig.mlp_layers must be an integer >= 0, got {self.mlp_layers!r}")
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"RSSMConfig.unimix must be in [0, 1), got {self.unimix}")
        for name in ("free_nats", "dyn_scale", "rep_scale", "learning_rate", "adam_eps", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RSSMConfig.{name} must be a finite number >= 0, got {value!r}")
        weight = self.terminal_weight
        if weight != "balanced" and (isinstance(weight, (str, bool)) or not isinstance(weight, (int, float))
                                     or not math.isfinite(weight) or weight <= 0):
            raise ValueError(f'RSSMConfig.terminal_weight must be a finite number > 0 or "balanced", got {weight!r}')
        if self.continue_input not in ("feature", "deter"):
            raise ValueError(f'RSSMConfig.continue_input must be "feature" or "deter", got {self.continue_input!r}')
        if not isinstance(self.vae_z_dim, int) or isinstance(self.vae_z_dim, bool) or self.vae_z_dim < 0:
            raise ValueError(f"RSSMConfig.vae_z_dim must be an integer >= 0 (0: the RSSM's own CNN), got {self.vae_z_dim!r}")
        epochs = self.continue_refit_epochs
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ValueError(f"RSSMConfig.continue_refit_epochs must be an integer >= 0, got {epochs!r}")
        if epochs and self.continue_input != "deter":
            raise ValueError('RSSMConfig.continue_refit_epochs needs continue_input = "deter": on [h, z] the refit head '
                             "would learn to tell the prior's z of terminal steps (a store has no frame after them) from the "
                             "posterior's z of all others (it scores 0.95 / 0.73 on held-out TakeCover that way)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RSSMConfig":
        """From a recipe table; unknown keys are an error that lists the known ones."""
        return config_from_table(cls, data, "RSSM")


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): squashes large magnitudes so one loss scale fits small and large rewards."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """The inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


def unimix_log_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Log-probabilities of (1 - unimix) softmax(logits) + unimix / classes, over the last dim."""
    if unimix == 0.0:
        return F.log_softmax(logits, -1)
    probs = F.softmax(logits, -1) * (1.0 - unimix) + unimix / logits.shape[-1]
    return probs.log()


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL[p || q] of categoricals given as log-probabilities (..., latents, classes), summed over latents."""
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def straight_through_sample(log_probs: torch.Tensor) -> torch.Tensor:
    """One-hot samples (..., latents, classes) with straight-through gradients (training; torch's RNG)."""
    probs = log_probs.exp()
    index = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])
    return F.one_hot(index, probs.shape[-1]).to(probs.dtype) + probs - probs.detach()


def mode_one_hot(log_probs: torch.Tensor) -> torch.Tensor:
    """The most likely class of every latent, one-hot."""
    return F.one_hot(log_probs.argmax(-1), log_probs.shape[-1]).to(log_probs.dtype)


def sample_class(log_probs: torch.Tensor, temperature: float | torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Class indices (N, latents) drawn from softmax(log_probs / tau) by inverse CDF on uniform noise (N, latents).

    temperature is a float or an (N,) tensor; tau -> 0 gives the mode. The noise comes from the caller, so every
    random number of a dream comes from the env's own seeded generator.
    """
    if isinstance(temperature, torch.Tensor) and temperature.ndim > 0:
        inv_tau = 1.0 / temperature.clamp(min=1e-4).view(-1, 1, 1)
    else:
        inv_tau = 1.0 / max(float(temperature), 1e-4)
    weights = ((log_probs - log_probs.amax(-1, keepdim=True)) * inv_tau).exp()
    cdf = weights.cumsum(-1)
    return (uniform.unsqueeze(-1) * cdf[..., -1:] >= cdf).sum(-1).clamp(max=log_probs.shape[-1] - 1)


def sample_categorical(log_probs: torch.Tensor, temperature: float | torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One-hot draws (N, latents, classes) of sample_class."""
    return F.one_hot(sample_class(log_probs, temperature, uniform), log_probs.shape[-1]).to(log_probs.dtype)


def dense(inputs: int, outputs: int) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU, DreamerV3's MLP layer."""
    return nn.Sequential(nn.Linear(inputs, outputs, bias=False), nn.LayerNorm(outputs), nn.SiLU())


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of every pixel of an NCHW map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, ChannelNorm(channels), nn.SiLU())


class ImageEncoder(nn.Module):
    """64x64x3 frames -> embedding: 4 stride-2 convs (depth x 1, 2, 4, 8) down to 4x4, flattened."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        channels = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(
            *(conv_block(nn.Conv2d(i, o, 4, 2, 1, bias=False), o) for i, o in zip(channels, channels[1:])),
            nn.Flatten(),
        )
        self.out_dim = 8 * depth * 4 * 4

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Float NCHW frames in [0, 1] -> (N, out_dim)."""
        return self.net(frames - 0.5)


class ImageDecoder(nn.Module):
    """Model state -> 64x64x3 frame: a linear layer to 4x4 x 8 depth, then 4 stride-2 transposed convs."""

    def __init__(self, feat_dim: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.linear = nn.Linear(feat_dim, 8 * depth * 4 * 4)
        channels = [8 * depth, 4 * depth, 2 * depth, depth]
        self.net = nn.Sequential(
            *(conv_block(nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), o) for i, o in zip(channels, channels[1:])),
            nn.ConvTranspose2d(depth, 3, 4, 2, 1),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, feat_dim) -> float NCHW frames, the mean image (about [0, 1]; clamp to display)."""
        return self.net(self.linear(feat).view(-1, 8 * self.depth, 4, 4)) + 0.5


class LayerNormGRU(nn.Module):
    """DreamerV3's GRU cell: one linear layer over [input, state] with LayerNorm, update gate biased to keep state."""

    def __init__(self, inputs: int, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        reset, cand, update = self.norm(self.linear(torch.cat([x, state], -1))).chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * state


def head(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    """An MLP of `layers` dense layers and a linear output."""
    sizes = [inputs] + [hidden] * layers
    return nn.Sequential(*(dense(i, o) for i, o in zip(sizes, sizes[1:])), nn.Linear(sizes[-1], outputs))


class RSSM(nn.Module):
    """Recurrent state-space model. State = (deter h (N, deter), stoch z (N, stoch * classes) one-hot).

    Step: h' = GRU(h, [z, a]); prior p(z' | h'); posterior q(z' | h', embed(frame')). Heads read the feature
    [h, z]: image decoder, reward (in symlog space), continue logit (p(episode goes on); h alone if
    config.continue_input is "deter"). With config.vae_z_dim, embed(frame) is a frozen V's mean z (the submodule
    `vae`, loaded by the trainer) and the decoder predicts that z, which V's decoder draws.
    """

    def __init__(self, config: RSSMConfig, action_dim: int) -> None:
        super().__init__()
        if action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {action_dim}")
        self.config = config
        self.action_dim = action_dim
        self.deter_dim = config.deter
        self.z_dim = config.stoch * config.classes
        self.feat_dim = config.deter + self.z_dim
        if config.vae_z_dim:
            self.vae: ConvVAE | None = ConvVAE(config.vae_z_dim).requires_grad_(False)
            self.encoder: ImageEncoder | None = None
            embed_dim = config.vae_z_dim
        else:
            self.vae, self.encoder = None, ImageEncoder(config.cnn_depth)
            embed_dim = self.encoder.out_dim
        self.img_in = dense(self.z_dim + action_dim, config.hidden)
        self.gru = LayerNormGRU(config.hidden, config.deter)
        self.prior_net = nn.Sequential(dense(config.deter, config.hidden), nn.Linear(config.hidden, self.z_dim))
        self.posterior_net = nn.Sequential(dense(config.deter + embed_dim, config.hidden),
                                           nn.Linear(config.hidden, self.z_dim))
        self.decoder = head(self.feat_dim, config.hidden, config.mlp_layers, config.vae_z_dim) if self.vae is not None \
            else ImageDecoder(self.feat_dim, config.cnn_depth)
        self.reward_head = head(self.feat_dim, config.hidden, config.mlp_layers, 1)
        continue_dim = config.deter if config.continue_input == "deter" else self.feat_dim
        self.continue_head = head(continue_dim, config.hidden, config.mlp_layers, 1)
        with torch.no_grad():  # DreamerV3: the reward output starts at zero, so early predictions are not wild
            self.reward_head[-1].weight.zero_()
            self.reward_head[-1].bias.zero_()

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        shaped = logits.view(*logits.shape[:-1], self.config.stoch, self.config.classes)
        return unimix_log_probs(shaped, self.config.unimix)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Float NCHW frames in [0, 1] -> embeddings (N, embed dim): the CNN's, or V's mean z."""
        return self.vae.encode(frames)[0] if self.vae is not None else self.encoder(frames)

    def embed(self, observations: torch.Tensor) -> torch.Tensor:
        """What the posterior reads, from training observations: frames through the CNN, or V's z as they are."""
        return observations if self.vae is not None else self.encoder(observations)

    def initial_deter(self, n: int) -> torch.Tensor:
        """h_0 = 0 for n episodes."""
        return torch.zeros(n, self.deter_dim)

    def recur(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """h' = GRU(h, [z, a]) for a batch."""
        return self.gru(self.img_in(torch.cat([stoch, action], -1)), deter)

    def prior(self, deter: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, stoch, classes) of p(z | h)."""
        return self._log_probs(self.prior_net(deter))

    def posterior(self, deter: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, stoch, classes) of q(z | h, embed(frame))."""
        return self._log_probs(self.posterior_net(torch.cat([deter, embed], -1)))

    def feature(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """[h, z] with z flattened (..., stoch * classes): what the heads read, and the dream's latent observation."""
        return torch.cat([deter, stoch], -1)

    def reconstruct(self, feat: torch.Tensor) -> torch.Tensor:
        """Feature -> the prediction of the training observation: frames, or V's z."""
        return self.decoder(feat)

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        """Feature -> float NCHW frames (the mean image)."""
        return self.vae.decode(self.decoder(feat)) if self.vae is not None else self.decoder(feat)

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted reward in real units (symexp of the symlog-space head)."""
        return symexp(self.reward_head(feat).squeeze(-1))

    def continue_logit(self, feat: torch.Tensor) -> torch.Tensor:
        """Logit of p(the episode goes on after this step), from the feature [h, z] (or its h, see continue_input)."""
        if self.config.continue_input == "deter":
            feat = feat[..., : self.deter_dim]
        return self.continue_head(feat).squeeze(-1)
