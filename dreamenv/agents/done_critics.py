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
from dreamenv.envs.noise import Noise
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

    def __init__(self, world_model: WorldModel, critics: Sequence[str | Path], bank_episodes: int | None = None,
                 seed: int = 0, data: Sequence[str | Path] | None = None, main_bank_z: torch.Tensor | None = None) -> None:
        """With `bank_episodes`, each critic builds its real-start bank from the same episodes of `data` as the
        bundle's (same seed), so a drawn bank row is the same real state for all; `main_bank_z` checks that."""
        if not critics:
            raise ValueError("done critics: give at least one bundle")
        self.cores: list[DreamCore] = []
        self.banks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in critics:
            critic = load_world_model(name)
            check_critic(world_model, critic, str(name))
            self.cores.append(DreamCore(critic))
            if bank_episodes is not None:
                states, _ = real_start_bank(critic, bank_episodes, np.random.default_rng(seed), False, data)
                if main_bank_z is not None and not torch.equal(states.z, main_bank_z):
                    raise ValueError(f"done critic {name}: its real starts are not the bundle's (same data and seed expected)")
                self.banks.append((states.h, states.c))
        self.states: list[DreamState] = []

    def start(self, z: torch.Tensor, rows: np.ndarray | None) -> None:
        """Every dream begins again at z: from bank `rows` (real starts) or, without a bank, from h = c = 0."""
        self.states = [DreamState(z.clone(), *self._recurrent(i, rows, len(z))) for i in range(len(self.cores))]

    def restart(self, dreams: np.ndarray, z: torch.Tensor, rows: np.ndarray | None) -> None:
        """Dreams `dreams` begin again at z (their fresh starts), as in `start`."""
        index = torch.from_numpy(dreams)
        with torch.inference_mode():  # the states come from inference-mode steps
            for i, state in enumerate(self.states):
                h, c = self._recurrent(i, rows, len(dreams))
                state.h[index], state.c[index] = h, c

    def _recurrent(self, critic: int, rows: np.ndarray | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return torch.zeros(n, self.cores[critic].hidden_size), torch.zeros(n, self.cores[critic].hidden_size)
        h, c = self.banks[critic]
        return h[torch.from_numpy(rows)].clone(), c[torch.from_numpy(rows)].clone()

    def step(self, z: torch.Tensor, actions: torch.Tensor) -> np.ndarray:
        """Each critic reads the dream's z_t and a_t; returns the largest of their p(done) for this step, (N,)."""
        n, z_dim = z.shape
        quiet = Noise(np.zeros((n, z_dim), np.float32), np.zeros((n, z_dim), np.float32), np.zeros(n, np.float32))
        worst = np.zeros(n, np.float32)
        for i, (core, state) in enumerate(zip(self.cores, self.states)):
            state, _, _ = core.step(DreamState(z, state.h, state.c), actions, 1.0, quiet, "threshold")
            self.states[i] = state
            worst = np.maximum(worst, core.done_probability(state))
        return worst
