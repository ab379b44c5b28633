"""V: the World Models ConvVAE that compresses a 64x64x3 frame into a small latent z."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class VAEConfig:
    """ConvVAE hyperparameters; defaults are the paper's (CarRacing: z=32; Doom used z=64)."""

    z_dim: int = 32
    kl_tolerance: float = 0.5  # free nats per latent dim: KL below kl_tolerance * z_dim is not penalised
    learning_rate: float = 1e-4
    batch_size: int = 100
    epochs: int = 10


class ConvVAE(nn.Module):
    """Encoder 4 convs (32-64-128-256, 4x4 stride 2) -> (mu, logvar); decoder 4 deconvs back to 64x64x3."""

    def __init__(self, z_dim: int = 32) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
            nn.Conv2d(128, 256, 4, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(1024, z_dim)
        self.fc_logvar = nn.Linear(1024, z_dim)
        self.fc_decode = nn.Linear(z_dim, 1024)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 6, stride=2), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float NCHW frames in [0, 1] -> (mu, logvar), each (N, z_dim)."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, z_dim) -> float NCHW frames in [0, 1]."""
        return self.decoder(self.fc_decode(z).view(-1, 1024, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def vae_loss(
    recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl_tolerance: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss: summed squared error per frame + KL clipped below kl_tolerance * z_dim."""
    reconstruction = F.mse_loss(recon, x, reduction="none").flatten(1).sum(1).mean()
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    kl = torch.clamp(kl, min=kl_tolerance * mu.shape[1]).mean()
    return reconstruction + kl, reconstruction, kl


def frames_to_tensor(frames) -> torch.Tensor:
    """uint8 NHWC numpy frames -> float32 NCHW tensor in [0, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_frames(x: torch.Tensor):
    """float NCHW tensor in [0, 1] -> uint8 NHWC numpy frames."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
