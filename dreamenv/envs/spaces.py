"""The spaces both envs share, and the action check that gives a clear error instead of a silent wrong step."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from dreamenv.worldmodel import WorldModel

OBS_MODES = ("latent", "latent_cell", "pixels")


def latent_dim(world_model: WorldModel, obs_mode: str) -> int:
    """Width of a latent observation: concat(z, h) for "latent"; concat(z, c, h) for "latent_cell", which adds the
    MDN-RNN's LSTM cell state c (the input of the original World Models code's Doom controller)."""
    if obs_mode == "latent":
        return world_model.latent_obs_dim
    if obs_mode == "latent_cell":
        if world_model.model_kind != "mdnrnn":
            raise ValueError(f"obs_mode 'latent_cell' needs an MDN-RNN bundle: this {world_model.model_kind} bundle has no "
                             "LSTM cell state; use obs_mode 'latent'")
        return world_model.latent_obs_dim + world_model.hidden_size
    raise ValueError(f"obs_mode must be 'latent' or 'latent_cell' for a latent observation, got {obs_mode!r}")


def observation_space(world_model: WorldModel, obs_mode: str) -> gym.spaces.Box:
    """Box of the latent observation (float32, see latent_dim) or of the 64x64x3 uint8 frame for "pixels"."""
    if obs_mode in ("latent", "latent_cell"):
        return gym.spaces.Box(-np.inf, np.inf, (latent_dim(world_model, obs_mode),), np.float32)
    if obs_mode == "pixels":
        size = world_model.frame_spec.size
        return gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
    raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")


def check_action(space: gym.Space, action: Any) -> np.ndarray | np.int64:
    """The action in `space` (Discrete: an np.int64 scalar as Discrete.sample() gives, never a 0-d array, which
    ViZDoom silently reads as "press every button"; Box: an array), or a ValueError naming the problem."""
    if isinstance(space, gym.spaces.Discrete):
        array = np.asarray(action)
        if array.size != 1 or not np.issubdtype(array.dtype, np.integer):
            if array.size == 1 and np.issubdtype(array.dtype, np.floating) and np.isnan(array).any():
                raise ValueError(f"action is NaN; expected an integer in [{space.start}, {space.start + space.n - 1}]")
            raise ValueError(
                f"action {action!r} (dtype {array.dtype}, shape {array.shape}) is not valid for {space}: "
                f"expected one integer in [{space.start}, {space.start + space.n - 1}]"
            )
        value = int(array.reshape(()))
        if not space.start <= value < space.start + space.n:
            raise ValueError(f"action {value} is outside {space}: expected an integer in [{space.start}, {space.start + space.n - 1}]")
        return np.int64(value)
    if isinstance(space, gym.spaces.Box):
        try:
            array = np.asarray(action, dtype=space.dtype)
        except (TypeError, ValueError) as err:
            raise ValueError(f"action {action!r} is not numeric: expected an array of shape {space.shape}") from err
        if array.shape != space.shape:
            raise ValueError(f"action has shape {array.shape}, expected {space.shape} for {space}")
        if np.isnan(array).any():
            raise ValueError(f"action {array} contains NaN: a policy produced an invalid action")
        if np.any(array < space.low) or np.any(array > space.high):
            raise ValueError(f"action {array} is outside the bounds of {space}; clip it to [low, high]")
        return array
    raise ValueError(f"unsupported action space {space}")
