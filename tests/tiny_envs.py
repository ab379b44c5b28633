"""Tiny synthetic envs for fast tests; importable in spawned workers as "tests.tiny_envs:<id>"."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

PIXELS_ID = "DreamenvTest/TinyPixels-v0"
PIXELS_BOX_ID = "DreamenvTest/TinyPixelsBox-v0"
VECTOR_ID = "DreamenvTest/TinyVector-v0"
HEALTH_ID = "DreamenvTest/TinyHealth-v0"
MODULE = "tests.tiny_envs"


class TinyPixels(gym.Env):
    """A dot moving on a 24x24 image; episodes end (terminated) after a random 5..30 steps; +1 per step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}
    size = 24

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.pos = np.zeros(2, dtype=np.float64)
        self.t = 0
        self.length = 0

    def _move(self, action: Any) -> np.ndarray:
        return np.array([int(action) - 1, 1.0])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(0, self.size, size=2)
        self.t = 0
        self.length = int(self.np_random.integers(5, 31))
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.pos = (self.pos + self._move(action)) % self.size
        self.t += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}

    def _image(self) -> np.ndarray:
        image = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        row, col = self.pos.astype(int) % self.size
        image[row, col] = (255, 128, 10 * self.t % 256)
        image[..., 2] += np.uint8(self.t)
        return image

    def _obs(self) -> Any:
        return self._image()

    def render(self) -> np.ndarray:
        return self._image()


class TinyPixelsBox(TinyPixels):
    """TinyPixels with Box(-1, 1, (2,)) actions."""

    def __init__(self, render_mode: str | None = None) -> None:
        super().__init__(render_mode)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _move(self, action: Any) -> np.ndarray:
        return 2.0 * np.asarray(action, dtype=np.float64)


class TinyVector(TinyPixels):
    """TinyPixels with a vector observation; frames only through render_mode='rgb_array'."""

    def __init__(self, render_mode: str | None = None) -> None:
        super().__init__(render_mode)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def _obs(self) -> Any:
        return np.array([*self.pos, self.t], dtype=np.float32)


class TinyHealth(TinyPixels):
    """TinyPixels as VizDoom observes: {"screen": image, "gamevariables": [health]}; each step the dot is hit with
    chance 1/4 (health - 1; action 0 never is) and the episode ends (terminated) when health reaches 0."""

    def __init__(self, render_mode: str | None = None) -> None:
        super().__init__(render_mode)
        self.observation_space = gym.spaces.Dict({
            "screen": gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8),
            "gamevariables": gym.spaces.Box(-np.inf, np.inf, (1,), np.float32),
        })
        self.health = 3.0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        self.health = 3.0
        return super().reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        hit = int(action) != 0 and self.np_random.random() < 0.25
        self.health -= float(hit)
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated or self.health <= 0, truncated, info

    def _obs(self) -> Any:
        return {"screen": self._image(), "gamevariables": np.array([self.health], dtype=np.float32)}


def register() -> None:
    """Register the tiny envs once (TinyPixels truncates at 20 steps so both flags occur)."""
    entries = {PIXELS_ID: ("TinyPixels", 20), PIXELS_BOX_ID: ("TinyPixelsBox", None), VECTOR_ID: ("TinyVector", None),
               HEALTH_ID: ("TinyHealth", None)}
    for env_id, (cls, limit) in entries.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{MODULE}:{cls}", max_episode_steps=limit)


register()
