"""Stable-Baselines3 adapter: a batched DreamVectorEnv as an SB3 VecEnv (same-step reset, terminal_observation)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np

try:
    from stable_baselines3.common.vec_env.base_vec_env import VecEnv
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise gym.error.DependencyNotInstalled(
        "the Stable-Baselines3 adapter needs stable-baselines3: pip install 'dreamenv[sb3]'"
    ) from err

from dreamenv.envs.vector import DreamVectorEnv


class SB3DreamVecEnv(VecEnv):
    """SB3's VecEnv over one DreamVectorEnv in SameStep autoreset mode: one torch call steps every env."""

    def __init__(self, venv: DreamVectorEnv) -> None:
        if venv.autoreset_mode != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError("SB3DreamVecEnv needs a DreamVectorEnv with autoreset_mode='SameStep'")
        self.venv = venv
        self.render_mode = venv.render_mode
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> np.ndarray:
        seeds = None if all(s is None for s in self._seeds) else self._seeds
        obs, _ = self.venv.reset(seed=seeds)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        dones = terminated | truncated
        out_infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones):
            out_infos[i]["terminal_observation"] = infos["final_obs"][i]
            out_infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, rewards.astype(np.float32), dones, out_infos

    def close(self) -> None:
        self.venv.close()

    def _indices(self, indices: None | int | Sequence[int]) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)

    def get_attr(self, attr_name: str, indices: None | int | Sequence[int] = None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: None | int | Sequence[int] = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: None | int | Sequence[int] = None, **method_kwargs: Any) -> list[Any]:
        return [getattr(self.venv, method_name)(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: None | int | Sequence[int] = None) -> list[bool]:
        return [False for _ in self._indices(indices)]


def sb3_vec_env(env: str | Path, n_envs: int = 8, **kwargs: Any) -> SB3DreamVecEnv:
    """An SB3 VecEnv of n_envs batched dreams, from a Dream-*-v0 id or a bundle directory / shipped name."""
    kwargs["autoreset_mode"] = gym.vector.AutoresetMode.SAME_STEP
    if isinstance(env, str) and env.split(":")[-1].startswith("Dream-"):
        venv = gym.make_vec(env, num_envs=n_envs, **kwargs)
    else:
        venv = DreamVectorEnv(n_envs, env, **kwargs)
    return SB3DreamVecEnv(venv)
