"""DreamVectorEnv: N dreams stepped in one batched torch call, a Gymnasium 1.x VectorEnv with autoreset."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dreamenv.agents.starts import StartStates
from dreamenv.envs.dream import ALIVE_FLOOR, TRAINING_DONE_MODES, NoiseBuffer, check_temperature, checked_done_mode, dream_core
from dreamenv.envs.spaces import observation_space
from dreamenv.registry import load_world_model


class DreamVectorEnv(VectorEnv):
    """num_envs dreams of one bundle, batched; sub-env i seeded with seed + i behaves exactly like DreamEnv(seed + i).

    temperature is a scalar or one value per env. done_mode "sample" or "threshold" ends a dream as DreamEnv does;
    "expected" (for training, as the actor-critic's and CMA-ES's) never draws a death: each step's reward is weighted
    by the chance the dream is still alive (the product of M's p(continue) so far), and the episode terminates once
    that chance is below ALIVE_FLOOR. autoreset_mode is "NextStep" (Gymnasium's default: the step
    after an episode ends resets that env and ignores its action) or "SameStep" (reset at once; the last
    observation is in infos["final_obs"], masked by infos["_final_obs"]).

    starts (agents.starts.StartStates; default: the bundle's first frames) says where episodes begin; with a real-start
    bank every episode begins at a state of a real episode, as Dreamer imagines from replayed states. A dream started
    at step t of its episode is truncated after max_episode_steps dream steps or at the env's limit, whichever comes
    first (short branches with a small max_episode_steps; an agent bootstraps its value there).
    """

    metadata = {"render_modes": ["rgb_array"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        bundle: str | Path,
        temperature: float | Sequence[float] | None = None,
        obs_mode: str = "latent",
        done_mode: str = "sample",
        done_threshold: float = 0.5,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        starts: StartStates | None = None,
    ) -> None:
        checked_done_mode(done_mode, TRAINING_DONE_MODES)
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            raise ValueError("DreamVectorEnv supports the NextStep and SameStep autoreset modes")
        self.metadata = {**self.metadata, "autoreset_mode": self.autoreset_mode}
        self.num_envs = int(num_envs)
        self.world_model = load_world_model(bundle)
        self.core = dream_core(self.world_model)
        self.obs_mode = obs_mode
        self.done_mode = done_mode
        self.done_threshold = float(done_threshold)
        self.render_mode = render_mode
        self.max_episode_steps = int(max_episode_steps or self.world_model.max_episode_steps)
        self.starts = starts or StartStates(self.core, None)
        self.temperature = self._temperatures(self.world_model.default_temperature if temperature is None else temperature)
        self.single_observation_space = observation_space(self.world_model, obs_mode)
        self.single_action_space = self.world_model.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(self.num_envs)]
        self._noise = NoiseBuffer(self.num_envs, *self.core.noise_dims)
        self._state: tuple[torch.Tensor, ...] | None = None  # the core's batched state (a NamedTuple of tensors)
        self._elapsed = np.zeros(self.num_envs, np.int64)
        self._limit = np.full(self.num_envs, self.max_episode_steps, np.int64)  # steps each episode may last
        self._alive = np.ones(self.num_envs, np.float64)  # done_mode "expected": the chance each dream is still alive
        self._needs_reset = np.zeros(self.num_envs, bool)

    def _temperatures(self, temperature: float | Sequence[float]) -> torch.Tensor:
        values = np.broadcast_to(np.asarray(temperature, np.float32), (self.num_envs,)).copy()
        for value in values:
            check_temperature(float(value))
        return torch.from_numpy(values)

    def _reset_envs(self, envs: np.ndarray) -> None:
        """Fresh episodes for the given env indices: a start state each (by default a first frame's latent and
        recurrent state 0), new noise."""
        drawn = [self.starts.draw(1, self._rngs[i]) for i in envs]
        fresh = type(drawn[0][0])(*(torch.cat(parts) for parts in zip(*(state for state, _ in drawn))))
        start_steps = np.array([step[0] for _, step in drawn], np.int64)
        self._limit[envs] = np.minimum(self.max_episode_steps, self.world_model.max_episode_steps - start_steps)
        with torch.inference_mode():  # the state tensors come from inference-mode steps
            for old, new in zip(self._state, fresh):
                old[torch.from_numpy(envs)] = new
        self._noise.clear(envs)
        self._elapsed[envs] = 0
        self._alive[envs] = 1.0

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset all envs (or options["reset_mask"]); an int seed s seeds env i with s + i."""
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
            for i, s in enumerate(seeds):
                if s is not None:
                    self._rngs[i] = seeding.np_random(s)[0]
        options = options or {}
        if "temperature" in options:
            self.temperature = self._temperatures(options["temperature"])
        mask = np.asarray(options.get("reset_mask", np.ones(self.num_envs, bool)), bool)
        if self._state is None:
            mask = np.ones(self.num_envs, bool)
            self._state = self.core.initial_state(np.zeros(self.num_envs, np.int64))  # every row is reset below
        self._reset_envs(np.flatnonzero(mask))
        self._needs_reset[mask] = False
        return self.core.observe(self._state, self.obs_mode), {}

    def _check_actions(self, actions: Any) -> np.ndarray:
        space = self.single_action_space
        array = np.asarray(actions)
        if isinstance(space, gym.spaces.Discrete):
            if array.shape != (self.num_envs,) or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"actions must be {self.num_envs} integers (shape ({self.num_envs},)), got dtype {array.dtype} shape {array.shape}")
            if np.any(array < space.start) or np.any(array >= space.start + space.n):
                raise ValueError(f"actions {array[(array < space.start) | (array >= space.start + space.n)]} are outside {space}")
            return array
        array = array.astype(space.dtype, copy=False)
        if array.shape != (self.num_envs, *space.shape):
            raise ValueError(f"actions have shape {array.shape}, expected {(self.num_envs, *space.shape)}")
        if np.isnan(array).any():
            raise ValueError("actions contain NaN: a policy produced an invalid action")
        if np.any(array < space.low) or np.any(array > space.high):
            raise ValueError(f"actions are outside the bounds of {space}; clip them to [low, high]")
        return array

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = self._check_actions(actions)
        active = ~self._needs_reset
        noise = self._noise.draw(self._rngs, active)
        expected = self.done_mode == "expected"
        state, rewards, terminated = self.core.step(
            self._state, self.world_model.encode_actions(actions), self.temperature, noise,
            "threshold" if expected else self.done_mode, self.done_threshold
        )
        self._state = state
        if expected:
            rewards = (rewards * self._alive).astype(rewards.dtype)
            self._alive *= 1.0 - self.core.done_probability(state)
            terminated = self._alive < ALIVE_FLOOR
        self._elapsed[active] += 1
        truncated = self._elapsed >= self._limit  # as TimeLimit: set even when terminated too
        infos: dict[str, Any] = {}
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            starting = np.flatnonzero(self._needs_reset)
            if len(starting):
                self._reset_envs(starting)
            rewards[~active], terminated[~active], truncated[~active] = 0.0, False, False
            self._needs_reset = terminated | truncated
            return self.core.observe(self._state, self.obs_mode), rewards, terminated, truncated, infos
        done = terminated | truncated
        observations = self.core.observe(self._state, self.obs_mode)
        if done.any():
            infos["final_obs"] = observations.copy()
            infos["_final_obs"] = done
            self._reset_envs(np.flatnonzero(done))
            observations = self.core.observe(self._state, self.obs_mode)
        return observations, rewards, terminated, truncated, infos

    def render(self) -> np.ndarray | None:
        """The decoded frames of all envs, (N, 64, 64, 3) uint8, in rgb_array mode."""
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return self.core.pixels(self._state)
