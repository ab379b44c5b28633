"""DAgger in the dream: the paper's linear controller fitted to a stronger teacher's actions (an actor-critic, PPO, any
saved policy) on the dream states the controller itself reaches, so the small controller inherits what the teacher
learned in the dream without CMA-ES's search, which finds the dream's exploits (standing still) first.

With `real_episodes`, the teacher also labels every state of that many recorded real episodes (as RealEnv sees them:
the actor-critic's real starts), and the controller fits those labels too: where a dream's states drift from the
game's, a linear map fitted on dream states alone can part from its teacher in the game (docs/agents.md measures it).
No new real frames are used."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from dreamenv.agents.controller import LinearController, dream_returns, output_dim, outputs_to_actions
from dreamenv.agents.starts import real_start_bank
from dreamenv.config import config_from_table
from dreamenv.envs.dream import TRAINING_DONE_MODES, checked_done_mode, dream_core
from dreamenv.envs.spaces import latent_dim
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel

STATE_FILE = "dagger.json"
DATA_DIR = "dagger"
REAL_FILE = "real.safetensors"  # the teacher's labels on recorded real states, under DATA_DIR


@dataclass
class DAggerConfig:
    """Rounds of: run `dreams` dreams with the current controller (the first round: with the teacher), label a
    `keep_fraction` of their steps with the teacher's deterministic action, and fit the controller to all labels so far."""

    teacher: str = ""  # a saved policy: train-agent directory, shipped agent name (with teacher_algo) or controller
    teacher_algo: str | None = None  # what saved it, as `dreamenv compare --algo` (None: found from the directory)
    rounds: int = 6
    dreams: int = 128
    keep_fraction: float = 0.25  # of the visited steps, labelled and kept (neighbouring steps are alike)
    fit_steps: int = 400  # Adam steps on the aggregated labels each round, warm from the previous round's fit
    batch_size: int = 4096
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4  # L2 penalty on W
    temperature: float | None = None  # None: the bundle's default
    done_mode: str = "sample"
    obs_mode: str = "latent"  # the controller's input; "latent_cell" adds M's cell state c to the teacher's [z, h]
    real_episodes: int = 0  # recorded real episodes whose every state the teacher labels too (0: dream states only)
    start_data: list[str] | None = None  # the stores of those episodes (None: the bundle's recorded rollouts)
    seed: int = 0

    def __post_init__(self) -> None:
        checked_done_mode(self.done_mode, TRAINING_DONE_MODES)
        if not self.teacher:
            raise ValueError("DAgger needs a teacher: a saved policy such as the shipped actor-critic "
                             "(--teacher VizdoomTakeCover --teacher-algo actor-critic)")
        for name in ("rounds", "dreams", "fit_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.real_episodes < 0:
            raise ValueError(f"real_episodes counts episodes: give 0 or more, not {self.real_episodes}")
        if self.start_data and not self.real_episodes:
            raise ValueError("start_data holds the real episodes the teacher labels: set real_episodes (--real-episodes N) "
                             "or drop it")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DAggerConfig":
        """A config from a recipe's [dagger] table; unknown keys are an error that lists the known ones."""
        return config_from_table(cls, data, "DAGGER")


def imitation_loss(raw: torch.Tensor, targets: torch.Tensor, space: gym.Space) -> torch.Tensor:
    """How far the controller's linear outputs are from the teacher's actions: cross-entropy for Discrete, squared
    error after the controller's own tanh squashing into [low, high] for Box."""
    if isinstance(space, gym.spaces.Discrete):
        return torch.nn.functional.cross_entropy(raw, targets.long() - int(space.start))
    low, high = (torch.as_tensor(np.asarray(v, np.float32).ravel()) for v in (space.low, space.high))
    actions = low + (torch.tanh(raw) + 1.0) / 2.0 * (high - low)
    return ((actions - targets.reshape(len(targets), -1)) ** 2).mean()


def teacher_view(obs: np.ndarray, obs_mode: str, teacher_mode: str, world_model: WorldModel) -> np.ndarray:
    """The teacher's observation from the controller's: the same one, or [z, h] cut out of [z, c, h] for a
    controller on the cell state ("latent_cell") taught by a policy on [z, h]."""
    if teacher_mode == obs_mode:
        return obs
    if (teacher_mode, obs_mode) == ("latent", "latent_cell"):
        return np.concatenate([obs[:, :world_model.z_dim], obs[:, world_model.z_dim + world_model.hidden_size:]], axis=1)
    raise ValueError(f"the teacher acts on obs_mode {teacher_mode!r}, which a controller on {obs_mode!r} cannot give it: "
                     f"use obs_mode {teacher_mode!r}")


def real_labels(world_model: WorldModel, teacher: Any, teacher_mode: str, config: DAggerConfig,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Every state of config.real_episodes recorded real episodes in the controller's observation, with the teacher's
    deterministic action there."""
    states, _ = real_start_bank(world_model, config.real_episodes, np.random.default_rng([config.seed, 1 << 20]),
                                progress, config.start_data)
    obs = dream_core(world_model).observe(states, config.obs_mode)
    actions = np.concatenate([np.asarray(teacher.predict(teacher_view(obs[i : i + 4096], config.obs_mode, teacher_mode,
                                                                      world_model), deterministic=True)[0])
                              for i in range(0, len(obs), 4096)])
    return {"obs": obs.astype(np.float32), "actions": actions.astype(np.float32)}


def train_dagger(bundle: Any, out: str | Path, config: DAggerConfig, progress: bool = True) -> LinearController:
    """DAgger a linear controller from config.teacher in the dream of `bundle`; writes a controller directory (as
    `dreamenv controller`) after every round and resumes from it and the labels kept in out/dagger/."""
    from dreamenv.compare import load_policy

    wm = load_world_model(bundle)
    teacher = load_policy(config.teacher, config.teacher_algo, wm)
    teacher_mode = getattr(teacher, "obs_mode", "latent")
    teacher_view(np.zeros((1, latent_dim(wm, config.obs_mode)), np.float32), config.obs_mode, teacher_mode, wm)  # fail early
    temperature = wm.default_temperature if config.temperature is None else config.temperature
    out = Path(out)
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    obs_dim, out_dim = latent_dim(wm, config.obs_mode), output_dim(wm.action_space)
    state_path = out / STATE_FILE
    history = json.loads(state_path.read_text())["history"] if state_path.is_file() else []
    weight = torch.zeros(out_dim, obs_dim)
    bias = torch.zeros(out_dim)
    if history:
        done = LinearController.load(out)
        weight, bias = torch.from_numpy(done.weight), torch.from_numpy(done.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    data = [load_file(str(out / DATA_DIR / f"round{r}.safetensors")) for r in range(len(history))]
    if config.real_episodes:
        real_path = out / DATA_DIR / REAL_FILE
        if not real_path.is_file():
            save_file(real_labels(wm, teacher, teacher_mode, config, progress), str(real_path))
        data.append(load_file(str(real_path)))
    info = {"env_id": wm.env_id, "bundle_fingerprint": wm.fingerprint, "trained_in": "dream", "obs_mode": config.obs_mode,
            "temperature": temperature, "dagger": asdict(config)}
    bar = tqdm(total=config.rounds, initial=len(history), desc=f"DAgger tau={temperature}", unit="round", disable=not progress)
    for round_ in range(len(history), config.rounds):
        rng = np.random.default_rng([config.seed, round_])
        student_w, student_b = weight.detach().numpy().copy(), bias.detach().numpy().copy()
        seen: list[tuple[np.ndarray, np.ndarray]] = []

        def policy(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
            labels = np.asarray(teacher.predict(teacher_view(obs, config.obs_mode, teacher_mode, wm), deterministic=True)[0])
            kept = rng.random(len(obs)) < config.keep_fraction
            seen.append((obs[kept], labels[kept]))
            return labels if round_ == 0 else outputs_to_actions(obs @ student_w.T + student_b, wm.action_space)

        returns, _ = dream_returns(wm, policy, config.dreams, temperature, rng, done_mode=config.done_mode,
                                   obs_mode=config.obs_mode)
        fresh = {"obs": np.concatenate([s[0] for s in seen]).astype(np.float32),
                 "actions": np.concatenate([s[1] for s in seen]).astype(np.float32)}
        save_file(fresh, str(out / DATA_DIR / f"round{round_}.safetensors"))
        data.append(fresh)
        obs = torch.from_numpy(np.concatenate([d["obs"] for d in data]))
        actions = torch.from_numpy(np.concatenate([d["actions"] for d in data]))
        torch.manual_seed(config.seed * 1000 + round_)
        optimiser = torch.optim.Adam([weight, bias], lr=config.learning_rate)
        for _ in range(config.fit_steps):
            rows = torch.randint(0, len(obs), (min(config.batch_size, len(obs)),))
            loss = imitation_loss(obs[rows] @ weight.T + bias, actions[rows], wm.action_space)
            loss = loss + config.weight_decay * (weight ** 2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            fit = float(imitation_loss(obs @ weight.T + bias, actions, wm.action_space))
        history.append({"round": round_ + 1, "rollouts_by": "teacher" if round_ == 0 else "controller",
                        "dream_return": float(returns.mean()), "labels": len(obs), "imitation_loss": fit})
        controller = LinearController(weight.detach().numpy(), bias.detach().numpy(), wm.action_space,
                                      {**info, "history": history})
        controller.save(out)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"history": history}, indent=2) + "\n")
        tmp.replace(state_path)
        bar.update(1)
        bar.set_postfix(dream_return=f"{returns.mean():.1f}", loss=f"{fit:.3f}")
    bar.close()
    return LinearController.load(out)
