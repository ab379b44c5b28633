"""RealEnv: the real game seen through the bundle's V and M, so its observations match the dream's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import EzPickle

from dreamenv.data.preprocess import extract_frame
from dreamenv.data.sources import make_source_env
from dreamenv.envs.spaces import check_action, observation_space
from dreamenv.registry import load_world_model


class RealEnv(gym.Env, EzPickle):
    """The bundle's real env with the dream's observation: concat(z_t, h_t) (or the preprocessed frame).

    z_t is V's mean latent of the real frame; h_t is M's LSTM state after (z_<t, a_<t), stepped in the same
    order as the dream. Reward, termination and truncation come from the game.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(
        self,
        bundle: str | Path,
        obs_mode: str = "latent",
        render_mode: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        EzPickle.__init__(self, bundle, obs_mode, render_mode, env_kwargs)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.world_model = load_world_model(bundle)
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.action_space = self.world_model.action_space
        self.observation_space = observation_space(self.world_model, obs_mode)
        spec = self.world_model.frame_spec
        needs_render = spec.from_render or render_mode == "rgb_array"
        self.env = make_source_env(
            self.world_model.env_id, render_mode="rgb_array" if needs_render else None, **(env_kwargs or {})
        )
        self._frame: np.ndarray | None = None
        self._z = self._h = self._c = None

    def _see(self, obs: Any) -> np.ndarray:
        self._frame = extract_frame(obs, self.env, self.world_model.frame_spec)
        self._z = self.world_model.encode_frames(self._frame[None])
        if self.obs_mode == "latent":
            return torch.cat([self._z, self._h], dim=-1)[0].numpy()
        return self._frame

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._h = torch.zeros(1, self.world_model.hidden_size)
        self._c = torch.zeros_like(self._h)
        return self._see(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._z is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        action = check_action(self.action_space, action)
        with torch.inference_mode():
            self._h, self._c = self.world_model.mdnrnn.step(
                self._z, self.world_model.encode_actions(action[None]), self._h, self._c
            )
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._see(obs), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.env.render()

    def close(self) -> None:
        self.env.close()
        super().close()
