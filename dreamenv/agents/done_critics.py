"""Done critics: other Ms of the same V follow each imagined dream and judge its deaths pessimistically.

An agent trained in one dream finds the states where that M says death is unlikely, and the game often disagrees
(docs/agents.md: the shipped dream rates its agent about 480 above the game). Ms trained otherwise (on other data,
with scheduled sampling) err in other places. Stepped beside the dream on the same z and actions, each gives its own
p(done), and the imagined step continues with 1 - the largest of them: the ensemble pessimism of MOPO (Yu et al.
2020) and MOReL (Kidambi et al. 2020), applied to the done head. The dream itself (z, h, reward) stays the bundle's, so
the agent reads what it will read in the game.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dreamenv.agents.starts import real_start_bank
from dreamenv.envs.dream import DreamCore, DreamState
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel


def check_critic(world_model: WorldModel, critic: WorldModel, name: str) -> None:
    """ValueError unless `critic` is an MDN-RNN of the same env, actions and V as `world_model`."""
    if world_model.model_kind != "mdnrnn" or critic.model_kind != "mdnrnn":
        raise ValueError(f"done critics are MDN-RNN Ms beside an MDN-RNN bundle; {name} or the bundle is an RSSM")
    if critic.env_id != world_model.env_id or critic.action_space != world_model.action_space:
        raise ValueError(f"done critic {name} is a world model of {critic.env_id} ({critic.action_space}), the bundle of "
                         f"{world_model.env_id} ({world_model.action_space}): give Ms of the same env")
    ours, theirs = world_model.vae.state_dict(), critic.vae.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError(f"done critic {name} has another V than the bundle: it must read the bundle's z, so train it "
                         "through the same V (dreamenv train ... --vae-from BUNDLE)")


class DoneCritics:
    """Other bundles' Ms stepped beside a batch of dreams; `step` gives the largest p(done) among them."""

    def __init__(self, world_model: WorldModel, critics: Sequence[str | Path]) -> None:
        if not critics:
            raise ValueError("done critics: give at least one bundle")
        self.names = [str(name) for name in critics]
        self.world_models = [load_world_model(name) for name in critics]
        for name, critic in zip(self.names, self.world_models):
            check_critic(world_model, critic, name)
        self.cores = [DreamCore(critic) for critic in self.world_models]
        self.banks: list[tuple[torch.Tensor, torch.Tensor]] = []  # each critic's (h, c) at the real starts
        self.states: list[tuple[torch.Tensor, torch.Tensor]] = []  # each critic's (h, c) in the current dreams

    def follow_real_starts(self, episodes: int, seed: int, data: Sequence[str | Path], bundle_z: torch.Tensor) -> None:
        """Each critic filters the episodes real_start_bank(bundle, episodes, default_rng(seed), data) chose, so a
        bank row is the same real state for all; `bundle_z`, the bundle's bank's z, checks that."""
        for name, critic in zip(self.names, self.world_models):
            states, _ = real_start_bank(critic, episodes, np.random.default_rng(seed), False, data)
            if not torch.equal(states.z, bundle_z):
                raise ValueError(f"done critic {name}: its real starts are not the bundle's (same data and seed expected)")
            self.banks.append((states.h, states.c))

    def start(self, n: int, rows: np.ndarray | None) -> None:
        """n dreams begin: at bank `rows` (real starts), or without a bank from h = c = 0 as M's first frames."""
        self.states = [self._recurrent(i, rows, n) for i in range(len(self.cores))]

    def restart(self, dreams: np.ndarray, rows: np.ndarray | None) -> None:
        """Dreams `dreams` begin again, as in `start`."""
        index = torch.from_numpy(dreams)
        with torch.inference_mode():  # the states come from inference-mode steps
            for i, (h, c) in enumerate(self.states):
                h[index], c[index] = self._recurrent(i, rows, len(dreams))

    def _recurrent(self, critic: int, rows: np.ndarray | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return torch.zeros(n, self.cores[critic].hidden_size), torch.zeros(n, self.cores[critic].hidden_size)
        h, c = self.banks[critic]
        return h[torch.from_numpy(rows)].clone(), c[torch.from_numpy(rows)].clone()

    def step(self, z: torch.Tensor, actions: torch.Tensor) -> np.ndarray:
        """Each critic reads the dream's z_t and a_t; returns the largest of their p(done) for this step, (N,)."""
        worst = np.zeros(len(z), np.float32)
        for i, (core, (h, c)) in enumerate(zip(self.cores, self.states)):
            self.states[i] = core.recurrent_step(DreamState(z, h, c), actions)  # no MDN draw: only p(done) is read
            worst = np.maximum(worst, core.done_probability(DreamState(z, *self.states[i])))
        return worst
