"""What every batched dream core shares: the initial-state draw, the noise draw and the observation switch."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from dreamenv.envs.noise import Noise, draw_noise
from dreamenv.worldmodel import WorldModel


class BatchedDreamCore(ABC):
    """Base of DreamCore (MDN-RNN) and RSSMDreamCore: subclasses set `wm` and `noise_dims` and define
    `latent_obs(state)` and `pixels(state)`, so the draws (and with them the seeding contract) live in one place."""

    wm: WorldModel
    noise_dims: tuple[int, int]  # (uniforms, normals) per env and step

    def draw_initial(self, rng: np.random.Generator, n: int = 1) -> np.ndarray:
        """Indices (int64, (n,)) of n random entries of the initial-state bank."""
        return rng.integers(0, self.wm.initial_z.shape[0], n)

    def draw_noise(self, rng: np.random.Generator, n: int) -> Noise:
        """One step's noise for n dreams drawn from one generator."""
        return draw_noise(rng, n, *self.noise_dims)

    @abstractmethod
    def latent_obs(self, state: Any, cell: bool = False) -> np.ndarray:
        """The batch's latent observations, float32 (N, latent_obs_dim); with `cell`, M's LSTM cell state too
        (obs_mode "latent_cell", MDN-RNN only)."""

    @abstractmethod
    def pixels(self, state: Any) -> np.ndarray:
        """The batch's decoded frames, uint8 (N, 64, 64, 3)."""

    def observe(self, state: Any, obs_mode: str) -> np.ndarray:
        """The batch of observations in `obs_mode` ("latent", "latent_cell" or "pixels")."""
        return self.pixels(state) if obs_mode == "pixels" else self.latent_obs(state, cell=obs_mode == "latent_cell")
