"""DreamEnv: a Gymnasium env that runs entirely inside a world model (no game engine), with a temperature knob."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import EzPickle

from dreamenv.envs.spaces import check_action, observation_space
from dreamenv.models.mdnrnn import sample_mdn
from dreamenv.models.vae import tensor_to_frames
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel

DONE_MODES = ("sample", "threshold")


class DreamState(NamedTuple):
    """Batched dream state: latent z_t (N, z_dim) and M's LSTM state h_t, c_t (N, hidden)."""

    z: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor


class DreamCore:
    """Batched dream dynamics shared by DreamEnv, CMA-ES and evaluation; noise comes from the caller's numpy generator."""

    def __init__(self, world_model: WorldModel) -> None:
        self.wm = world_model
        self.z_dim = world_model.z_dim
        self.hidden_size = world_model.hidden_size

    def reset(self, rng: np.random.Generator, n: int) -> DreamState:
        """z_0 drawn from the bank of encoded first frames, h_0 = c_0 = 0."""
        index = rng.integers(0, self.wm.initial_z.shape[0], size=n)
        zeros = torch.zeros(n, self.hidden_size)
        return DreamState(self.wm.initial_z[torch.from_numpy(index)].clone(), zeros, zeros.clone())

    @torch.inference_mode()
    def step(
        self,
        state: DreamState,
        actions: torch.Tensor,
        temperature: float | torch.Tensor,
        rng: np.random.Generator,
        done_mode: str = "sample",
        done_threshold: float = 0.5,
    ) -> tuple[DreamState, np.ndarray, np.ndarray]:
        """h' = M(z, a, h); z' ~ MDN(h') at temperature; reward and termination from M's heads."""
        n = state.z.shape[0]
        h, c = self.wm.mdnrnn.step(state.z, actions, state.h, state.c)
        out = self.wm.mdnrnn.heads(h)
        uniform = torch.from_numpy(rng.random((n, self.z_dim), dtype=np.float32))
        normal = torch.from_numpy(rng.standard_normal((n, self.z_dim), dtype=np.float32))
        z = sample_mdn(out, temperature, uniform, normal)
        done_prob = torch.sigmoid(out.done_logit).numpy()
        if done_mode == "sample":
            terminated = rng.random(n) < done_prob
        else:
            terminated = done_prob > done_threshold
        return DreamState(z, h, c), out.reward.numpy().astype(np.float32), terminated

    def latent_obs(self, state: DreamState) -> np.ndarray:
        """concat(z_t, h_t) as float32 (N, z_dim + hidden)."""
        return torch.cat([state.z, state.h], dim=-1).numpy()

    @torch.inference_mode()
    def pixels(self, state: DreamState) -> np.ndarray:
        """V's decoding of z_t as uint8 (N, 64, 64, 3)."""
        return tensor_to_frames(self.wm.vae.decode(state.z))


class DreamEnv(gym.Env, EzPickle):
    """A world model as a gym.Env: observation concat(z, h) (or decoded pixels), reward and done from M's heads.

    Args:
        bundle: a bundle directory or a shipped name such as "VizdoomTakeCover".
        temperature: tau of the MDN sampling; None takes the bundle's default. Settable between episodes
            through `env.unwrapped.temperature` or `reset(options={"temperature": tau})`.
        obs_mode: "latent" (concat(z_t, h_t), float32) or "pixels" (64x64x3 uint8 decoded by V).
        done_mode: "sample" (Bernoulli of M's done probability) or "threshold".
        done_threshold: probability above which an episode ends in "threshold" mode.
        render_mode: None or "rgb_array" (the decoded frame).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(
        self,
        bundle: str | Path,
        temperature: float | None = None,
        obs_mode: str = "latent",
        done_mode: str = "sample",
        done_threshold: float = 0.5,
        render_mode: str | None = None,
    ) -> None:
        EzPickle.__init__(self, bundle, temperature, obs_mode, done_mode, done_threshold, render_mode)
        if done_mode not in DONE_MODES:
            raise ValueError(f"done_mode must be one of {DONE_MODES}, got {done_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.world_model = load_world_model(bundle)
        self.core = DreamCore(self.world_model)
        self.temperature = self.world_model.default_temperature if temperature is None else float(temperature)
        check_temperature(self.temperature)
        self.obs_mode = obs_mode
        self.done_mode = done_mode
        self.done_threshold = float(done_threshold)
        self.render_mode = render_mode
        self.action_space = self.world_model.action_space
        self.observation_space = observation_space(self.world_model, obs_mode)
        self._state: DreamState | None = None

    def _observation(self) -> np.ndarray:
        if self.obs_mode == "latent":
            return self.core.latent_obs(self._state)[0]
        return self.core.pixels(self._state)[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and "temperature" in options:
            self.temperature = check_temperature(float(options["temperature"]))
        self._state = self.core.reset(self.np_random, 1)
        return self._observation(), {"temperature": self.temperature}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        encoded = self.world_model.encode_actions(check_action(self.action_space, action)[None])
        self._state, reward, terminated = self.core.step(
            self._state, encoded, self.temperature, self.np_random, self.done_mode, self.done_threshold
        )
        return self._observation(), float(reward[0]), bool(terminated[0]), False, {}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return self.core.pixels(self._state)[0]


def check_temperature(temperature: float) -> float:
    """Temperature must be a finite number >= 0."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return temperature
