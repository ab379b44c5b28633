"""The random numbers of a dream step, drawn from each env's own generator so batched and single dreams agree."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Noise(NamedTuple):
    """The random numbers of one dream step for N envs: categorical choices, Gaussian noise, done draw.

    The widths depend on the model: the MDN-RNN uses z_dim uniforms (mixture choice) and z_dim normals;
    the RSSM one uniform per categorical latent and no normals.
    """

    uniform: np.ndarray  # (N, uniform_dim)
    normal: np.ndarray  # (N, normal_dim)
    done: np.ndarray  # (N,)


def draw_noise(rng: np.random.Generator, n: int, uniform_dim: int, normal_dim: int) -> Noise:
    """One step's noise for n dreams sharing one generator (uniform, then normal, then done draws)."""
    return Noise(rng.random((n, uniform_dim), dtype=np.float32), rng.standard_normal((n, normal_dim), dtype=np.float32),
                 rng.random(n, dtype=np.float32))


class NoiseBuffer:
    """Per-env noise drawn in blocks from each env's own generator: N batched dreams draw exactly what N single dreams do."""

    def __init__(self, num_envs: int, uniform_dim: int, normal_dim: int, block: int = 128) -> None:
        self.block = block
        self.uniform = np.zeros((num_envs, block, uniform_dim), np.float32)
        self.normal = np.zeros((num_envs, block, normal_dim), np.float32)
        self.done = np.zeros((num_envs, block), np.float32)
        self.pos = np.full(num_envs, block)
        self._rows = np.arange(num_envs)

    def clear(self, envs: np.ndarray | slice | int) -> None:
        """Forget buffered draws (on reset), so an episode's draws start fresh from its generator."""
        self.pos[envs] = self.block

    def draw(self, rngs: list[np.random.Generator], active: np.ndarray | None = None) -> Noise:
        """The next step's noise; only `active` envs (default all) consume draws."""
        stale = self.pos >= self.block if active is None else (self.pos >= self.block) & active
        for i in np.flatnonzero(stale):
            rng = rngs[i]
            self.uniform[i] = rng.random(self.uniform.shape[1:], dtype=np.float32)
            self.normal[i] = rng.standard_normal(self.normal.shape[1:], dtype=np.float32)
            self.done[i] = rng.random(self.block, dtype=np.float32)
            self.pos[i] = 0
        pos = np.minimum(self.pos, self.block - 1)
        noise = Noise(self.uniform[self._rows, pos], self.normal[self._rows, pos], self.done[self._rows, pos])
        if active is None:
            self.pos += 1
        else:
            self.pos[active] += 1
        return noise
