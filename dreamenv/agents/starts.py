"""Where dreams start: the bundle's initial-state bank, or latent states of the real episodes it was trained on
(followed through V + M, or the RSSM's posterior, exactly as RealEnv follows the game), as DreamerV3 starts its
imagination from replayed states. Shared by the actor-critic and the CMA-ES controller."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dreamenv.data.dataset import Rollouts, open_rollouts
from dreamenv.envs.dream import DreamCore, dream_core
from dreamenv.envs.real import latent_filter
from dreamenv.envs.rssm_core import RSSMDreamCore
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel

FILTER_GROUP = 16  # real episodes followed side by side when building the start bank


def recorded_rollouts(world_model: WorldModel) -> list[Path]:
    """The rollout stores the bundle records training on; FileNotFoundError when it records none or one is not here."""
    stores = [Path(p) for p in world_model.info.get("data", {}).get("rollouts", [])]
    if not stores:
        raise FileNotFoundError("the bundle records no rollout stores")
    missing = [str(p) for p in stores if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the bundle's rollouts {missing} are not found here (paths are as recorded at training; "
                                "a shipped bundle's data is not shipped: collect some and pass it as start_data, "
                                "`--start-data DATA.h5`)")
    return stores


def check_start_data(world_model: WorldModel, store: Rollouts) -> None:
    """Raise ValueError unless `store` holds rollouts of the bundle's env, preprocessing and action space."""
    if (store.env_id, store.frame_spec, store.action_space) != (world_model.env_id, world_model.frame_spec, world_model.action_space):
        raise ValueError(f"{store.path} holds {store.env_id} rollouts ({store.frame_spec}, {store.action_space}); the bundle is "
                         f"a world model of {world_model.env_id} ({world_model.frame_spec}, {world_model.action_space}): "
                         f"collect start data with `dreamenv collect {world_model.env_id}`")


@torch.inference_mode()
def real_start_bank(world_model: WorldModel, episodes: int, rng: np.random.Generator, progress: bool = False,
                    data: Sequence[str | Path] | None = None) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """Every step's latent state of `episodes` random episodes of `data` (default: the bundle's recorded rollouts),
    and its step number.

    The states are what RealEnv sees (latent_filter: V's latents and M's recurrent state after each real prefix, or
    the RSSM's posterior), as dream-core states, so imagination can start from real situations as in DreamerV3.
    """
    with ExitStack() as stack:
        stores = [stack.enter_context(open_rollouts(path)) for path in (data or recorded_rollouts(world_model))]
        for store in stores:
            check_start_data(world_model, store)
        refs = [(store, int(start), int(end)) for store in stores for start, end in store.episode_bounds()]
        actions = {id(store): store.load_arrays()["actions"] for store in stores}
        chosen = rng.choice(len(refs), size=min(episodes, len(refs)), replace=False)
        states, steps = [], []
        for first in tqdm(range(0, len(chosen), FILTER_GROUP), desc="real starts", unit="group", disable=not progress):
            group = [refs[i] for i in chosen[first : first + FILTER_GROUP]]
            frames = [store.load_frames(np.arange(start, end)) for store, start, end in group]
            acts = [actions[id(store)][start:end] for store, start, end in group]
            lengths = np.array([end - start for _, start, end in group])
            tracker = latent_filter(world_model, len(group))
            for t in range(int(lengths.max())):
                last = np.minimum(t, lengths - 1)  # ended episodes repeat their last frame and action, dropped below
                tracker.observe(np.stack([f[i] for f, i in zip(frames, last)]))
                rows = torch.from_numpy(np.flatnonzero(t < lengths))
                here = tracker.dream_state()
                states.append(type(here)(*(x[rows] for x in here)))
                steps.append(np.full(len(rows), t, np.int64))
                tracker.advance(np.stack([a[i] for a, i in zip(acts, last)]))
    return type(states[0])(*(torch.cat(parts) for parts in zip(*states))), np.concatenate(steps)


class StartStates:
    """Where imagined rollouts start: rows of a real-state bank (real_start_bank), or without one the bundle's
    initial-state bank (encoded first frames, recurrent state 0)."""

    def __init__(self, core: DreamCore | RSSMDreamCore, bank: tuple[tuple[torch.Tensor, ...], np.ndarray] | None) -> None:
        self.core = core
        self.bank = bank

    def draw(self, n: int, rng: np.random.Generator) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
        """n random start states (a dream-core state) and the episode step each one is at."""
        return self.draw_with_rows(n, rng)[:2]

    def draw_with_rows(self, n: int, rng: np.random.Generator) -> tuple[tuple[torch.Tensor, ...], np.ndarray, np.ndarray | None]:
        """draw, and the bank rows drawn (None from the initial-state bank), so other Ms can follow the same starts."""
        if self.bank is None:
            return self.core.initial_state(self.core.draw_initial(rng, n)), np.zeros(n, np.int64), None
        states, steps = self.bank
        rows = rng.integers(0, len(steps), n)
        return type(states)(*(x[torch.from_numpy(rows)] for x in states)), steps[rows], rows

    def info(self) -> dict[str, str | int]:
        """Where the dreams start, for agent.json: {"starts": "initial"} or "real" with the bank's size."""
        return {"starts": "initial"} if self.bank is None else {"starts": "real", "real_start_states": len(self.bank[1])}


def real_starts(bundle: WorldModel | str | Path, data: Sequence[str | Path], episodes: int = 64, seed: int = 0,
                progress: bool = False) -> StartStates:
    """Start states from `episodes` random real episodes of the rollout stores `data`, for
    DreamVectorEnv(starts=...) or sb3_vec_env(..., starts=...): dreams that begin where real episodes were."""
    world_model = load_world_model(bundle)
    return StartStates(dream_core(world_model), real_start_bank(world_model, episodes, np.random.default_rng(seed),
                                                                progress, data))
