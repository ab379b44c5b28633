"""C: the paper's linear controller a = W [z, h] + b (or W [z, c, h] + b, as the original code's Doom controller),
stored as safetensors + JSON, and its CMA-ES trainer in the dream."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cma
import gymnasium as gym
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from dreamenv.agents.starts import StartStates, real_start_bank
from dreamenv.config import checked_temperature_range
from dreamenv.envs.dream import ALIVE_FLOOR, TRAINING_DONE_MODES, checked_done_mode, dream_core
from dreamenv.envs.real import latent_filter
from dreamenv.envs.spaces import latent_dim
from dreamenv.registry import load_world_model, resolve_controller
from dreamenv.spaces import space_from_json, space_to_json
from dreamenv.worldmodel import WorldModel

CONTROLLER_FORMAT = "dreamenv-controller"


def output_dim(space: gym.Space) -> int:
    """Number of linear outputs for an action space: one per action (Discrete) or per dimension (Box)."""
    return int(space.n) if isinstance(space, gym.spaces.Discrete) else int(np.prod(space.shape))


def outputs_to_actions(raw: np.ndarray, space: gym.Space) -> np.ndarray:
    """Linear outputs (..., out) -> actions: argmax for Discrete, tanh scaled into [low, high] for Box."""
    if isinstance(space, gym.spaces.Discrete):
        return raw.argmax(-1).astype(np.int64) + int(space.start)
    squashed = (np.tanh(raw) + 1.0) / 2.0
    actions = space.low + squashed.reshape(*raw.shape[:-1], *space.shape) * (space.high - space.low)
    return actions.astype(space.dtype)


class ControllerMismatchError(ValueError):
    """A controller trained for another bundle (other env, other world model)."""


class LinearController:
    """a = W [z, h] + b on the dream's latent observation (info["obs_mode"] "latent_cell": W [z, c, h] + b);
    predict() follows Stable-Baselines3's signature."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, action_space: gym.Space, info: dict[str, Any] | None = None) -> None:
        self.weight = np.asarray(weight, np.float32)
        self.bias = np.asarray(bias, np.float32)
        self.action_space = action_space
        self.info = info or {}

    @staticmethod
    def num_params(obs_dim: int, action_space: gym.Space) -> int:
        return (obs_dim + 1) * output_dim(action_space)

    @classmethod
    def from_flat(cls, params: np.ndarray, obs_dim: int, action_space: gym.Space, info: dict[str, Any] | None = None) -> "LinearController":
        out = output_dim(action_space)
        params = np.asarray(params, np.float32)
        return cls(params[: out * obs_dim].reshape(out, obs_dim), params[out * obs_dim :], action_space, info)

    @property
    def obs_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def obs_mode(self) -> str:
        """The latent observation it acts on: "latent" (concat(z, h)) or "latent_cell" (concat(z, c, h))."""
        return self.info.get("obs_mode", "latent")

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for one observation (obs_dim,) or a batch (N, obs_dim)."""
        obs = np.asarray(obs, np.float32)
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation has {obs.shape[-1]} features, this controller takes {self.obs_dim} "
                             f"(obs_mode {self.obs_mode!r}: create the env with obs_mode={self.obs_mode!r})")
        return outputs_to_actions(obs @ self.weight.T + self.bias, self.action_space)

    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None, deterministic: bool = True) -> tuple[np.ndarray, None]:
        """SB3-style: (action, None). The linear controller is deterministic."""
        return self.act(observation), None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.act(obs)

    def check_bundle(self, world_model: WorldModel) -> None:
        """Raise ControllerMismatchError unless this controller was trained on `world_model`."""
        expected = self.info.get("bundle_fingerprint")
        if self.info.get("env_id") not in (None, world_model.env_id):
            raise ControllerMismatchError(
                f"controller was trained for {self.info.get('env_id')}, the bundle is of {world_model.env_id}: "
                "train a controller on this bundle (dreamenv controller BUNDLE --out DIR)."
            )
        bundle_dim = latent_dim(world_model, self.obs_mode)
        if self.obs_dim != bundle_dim or (expected and expected != world_model.fingerprint):
            raise ControllerMismatchError(
                f"controller was trained on another world model (bundle {str(expected)[:12]}, obs {self.obs_dim}) than "
                f"this bundle ({world_model.fingerprint[:12]}, obs {bundle_dim}): "
                "train a controller on this bundle (dreamenv controller BUNDLE --out DIR)."
            )

    def save(self, path: str | Path) -> Path:
        """Write controller.safetensors (W, b) and controller.json (space, bundle, training info)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight, "bias": self.bias}, str(path / "controller.safetensors"))
        meta = {"format": CONTROLLER_FORMAT, "format_version": 1, "kind": "linear",
                "action_space": space_to_json(self.action_space), "obs_dim": self.obs_dim, "info": self.info}
        (path / "controller.json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LinearController":
        path = Path(path)
        meta_path = path / "controller.json"
        if not meta_path.is_file() or not (path / "controller.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a dreamenv controller (needs controller.json and controller.safetensors)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CONTROLLER_FORMAT or meta.get("format_version", 0) > 1:
            raise ValueError(f"{meta_path}: not a controller this dreamenv can read (format {meta.get('format')} v{meta.get('format_version')})")
        tensors = load_file(str(path / "controller.safetensors"))
        return cls(tensors["weight"], tensors["bias"], space_from_json(meta["action_space"]), meta.get("info", {}))


def load_controller(controller: str | Path, bundle: Any = None) -> LinearController:
    """A saved controller directory or a shipped name ('VizdoomTakeCover'); checked against `bundle` when given."""
    model = LinearController.load(resolve_controller(controller))
    if bundle is not None:
        model.check_bundle(load_world_model(bundle))
    return model


@dataclass(frozen=True)
class ControllerPolicy:
    """A collection policy factory: a trained policy acts on frames seen through its bundle's world model, as in RealEnv.

    algo "linear" is a controller; another (actor-critic, ppo, sac) is a `dreamenv train-agent` agent. With epsilon > 0
    each step takes a random action with that probability instead (drawn from the env's action space, which the
    collector seeds per episode), so M also sees what the policy's other choices lead to.
    """

    bundle: str
    controller: str
    algo: str = "linear"
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon is the probability of a random action: give a value in [0, 1], not {self.epsilon}")

    @property
    def name(self) -> str:
        name = f"{'controller' if self.algo == 'linear' else self.algo}:{self.controller}"
        return f"{name} epsilon={self.epsilon:g}" if self.epsilon else name

    def __call__(self, env: gym.Env) -> Callable[[Any, np.ndarray], Any]:
        from dreamenv.compare import load_policy

        wm = load_world_model(self.bundle)
        policy = load_policy(self.controller, self.algo, wm)
        tracker = latent_filter(wm, obs_mode=getattr(policy, "obs_mode", "latent"))
        space = env.action_space

        def act(obs: Any, frame: np.ndarray) -> Any:
            action = policy.predict(tracker.observe(frame[None])[0], deterministic=True)[0]
            if self.epsilon and space.np_random.random() < self.epsilon:
                action = space.sample()
            tracker.advance(np.asarray(action)[None])
            return action

        return act


def dream_returns(
    world_model: WorldModel,
    policy: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n: int,
    temperature: float | np.ndarray,
    rng: np.random.Generator,
    max_steps: int | None = None,
    done_mode: str = "sample",
    done_threshold: float = 0.5,
    obs_mode: str = "latent",
    starts: StartStates | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run n dreams as one batch until each terminates or max_steps; returns (returns, lengths).

    done_mode "sample" or "threshold" ends dreams as DreamEnv does. "expected" never draws a death: each step's reward
    counts times the chance the dream is still alive (the product of M's p(continue) so far), so a return is the
    sampled dream's expected return given the latents; a dream stops once that chance falls below ALIVE_FLOOR.

    policy(obs (m, obs_dim), rows (m,)) -> actions for the rows still running; rows index 0..n-1, so a
    population can give each row its own controller. Finished rows drop out of the batch.
    temperature is one float or an (n,) array, one per dream (randomised temperature).
    starts (default: the bundle's initial-state bank) says where the dreams begin; a dream started at step t of a
    real episode also stops at the episode limit, after max_episode_steps - t steps.
    """
    core = dream_core(world_model)
    max_steps = max_steps or world_model.max_episode_steps
    state, start_steps = (starts or StartStates(core, None)).draw(n, rng)
    limit = np.minimum(max_steps, world_model.max_episode_steps - start_steps)
    per_row_tau = np.ndim(temperature) > 0
    if per_row_tau and np.shape(temperature) != (n,):
        raise ValueError(f"temperature must be a float or an array of shape ({n},), got shape {np.shape(temperature)}")
    tau = torch.as_tensor(np.asarray(temperature, np.float32)) if per_row_tau else float(temperature)
    expected = done_mode == "expected"
    rows = np.arange(n)
    returns = np.zeros(n, np.float64)
    lengths = np.zeros(n, np.int64)
    alive = np.ones(n, np.float64)
    for _ in range(int(limit.max())):
        actions = policy(core.observe(state, obs_mode), rows)
        m = len(rows)
        noise = core.draw_noise(rng, m)
        state, reward, terminated = core.step(state, world_model.encode_actions(actions), tau, noise,
                                              "threshold" if expected else done_mode, done_threshold)
        returns[rows] += reward * alive[rows]
        lengths[rows] += 1
        if expected:
            alive[rows] *= 1.0 - core.done_probability(state)
            terminated = alive[rows] < ALIVE_FLOOR
        terminated = terminated | (lengths[rows] >= limit[rows])
        if terminated.any():
            keep = torch.from_numpy(~terminated)
            state = type(state)(*(t[keep] for t in state))
            rows = rows[~terminated]
            if per_row_tau:
                tau = tau[keep]
            if len(rows) == 0:
                break
    return returns, lengths


@dataclass
class CMAESConfig:
    """CMA-ES in the dream; defaults are the paper's (population 64, 16 rollouts per candidate)."""

    population: int = 64
    rollouts: int = 16
    generations: int = 100
    sigma0: float = 0.1
    temperature: float | None = None  # None: the bundle's default
    temperature_range: tuple[float, float] | None = None  # per-dream tau drawn uniformly from it (overrides temperature)
    done_mode: str = "sample"  # "sample": Bernoulli of M's p(done); "threshold": done when p(done) > done_threshold;
    # "expected": no draw, rewards weighted by the chance of being alive (dream_returns)
    done_threshold: float = 0.5
    max_steps: int | None = None  # None: the bundle's episode limit
    obs_mode: str = "latent"  # the controller's input: "latent" = [z, h]; "latent_cell" = [z, c, h] (MDN-RNN only)
    real_starts: bool = False  # dreams start from states of the bundle's real episodes (short branches with max_steps)
    real_start_episodes: int = 64  # real episodes followed to build that start bank
    start_data: list[str] | None = None  # rollout stores of the real starts (None: the bundle's recorded rollouts)
    init_from: str | None = None  # a saved controller whose weights are the first mean (the iterative procedure's C)
    seed: int = 0

    def __post_init__(self) -> None:
        checked_done_mode(self.done_mode, TRAINING_DONE_MODES)
        if self.real_start_episodes < 1:
            raise ValueError(f"real_start_episodes must be >= 1, got {self.real_start_episodes}")
        if self.start_data and not self.real_starts:
            raise ValueError("start_data is where real starts come from: set real_starts = true (--real-starts) or drop it")
        if self.obs_mode not in ("latent", "latent_cell"):
            raise ValueError(f"obs_mode must be 'latent' or 'latent_cell' for a linear controller, got {self.obs_mode!r}")
        self.temperature_range = checked_temperature_range(self.temperature_range)


def warm_start_params(controller: str | Path, world_model: WorldModel, obs_mode: str) -> np.ndarray:
    """The flat (W, b) of a saved controller, to start CMA-ES from in another dream of the same env and shapes.

    Its bundle may differ (a retrained M): only the env, the observation size and mode and the action space must match.
    """
    source = load_controller(controller)
    trained_on = source.info.get("env_id", world_model.env_id)
    wanted = (world_model.env_id, latent_dim(world_model, obs_mode), obs_mode, world_model.action_space)
    found = (trained_on, source.obs_dim, source.obs_mode, source.action_space)
    if found != wanted:
        raise ValueError(f"init_from {controller}: a controller of {found[0]} on {found[1]} {found[2]!r} features with "
                         f"actions {found[3]}, but CMA-ES here needs {wanted[0]}, {wanted[1]} {wanted[2]!r} features and "
                         f"{wanted[3]}: start from a controller of this env and obs_mode, or drop init_from")
    return np.concatenate([source.weight.ravel(), source.bias.ravel()]).astype(np.float64)


def train_controller(
    bundle: Any, out: str | Path, config: CMAESConfig | None = None, progress: bool = True
) -> LinearController:
    """CMA-ES on the linear controller, every candidate x rollout dreamed in one batch; resumes from out/cmaes.json.

    The first mean is zero, or config.init_from's weights (read only when out holds no CMA-ES state yet).
    """
    config = config or CMAESConfig()
    wm = load_world_model(bundle)
    temperature = wm.default_temperature if config.temperature is None else config.temperature
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "cmaes.json"
    obs_dim = latent_dim(wm, config.obs_mode)
    dim = LinearController.num_params(obs_dim, wm.action_space)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state is not None and len(state["mean"]) != dim:
        raise ValueError(f"{state_path} belongs to another controller shape; remove it or choose another --out")
    generation = state["generation"] if state else 0
    if state:
        first_mean = state["mean"]
    elif config.init_from is not None:
        first_mean = warm_start_params(config.init_from, wm, config.obs_mode)
    else:
        first_mean = np.zeros(dim)
    es = cma.CMAEvolutionStrategy(
        first_mean, state["sigma"] if state else config.sigma0,
        {"popsize": config.population, "seed": config.seed + generation + 1, "verbose": -9},
    )
    history = state["history"] if state else []
    out_dim = output_dim(wm.action_space)
    starts = None
    if config.real_starts:
        try:
            bank = real_start_bank(wm, config.real_start_episodes, np.random.default_rng(config.seed), progress,
                                   config.start_data)
        except FileNotFoundError as err:
            raise ValueError(f"real_starts needs the bundle's rollouts: {err}; train without real starts") from None
        starts = StartStates(dream_core(wm), bank)
    bar = tqdm(total=config.generations, initial=generation, desc=f"CMA-ES tau={config.temperature_range or temperature}", unit="gen", disable=not progress)
    while generation < config.generations:
        asked = np.asarray(es.ask())
        candidates = asked.astype(np.float32)
        weights = candidates[:, : out_dim * obs_dim].reshape(-1, out_dim, obs_dim)
        biases = candidates[:, out_dim * obs_dim :]
        owner = np.repeat(np.arange(len(candidates)), config.rollouts)

        def policy(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
            who = owner[rows]
            raw = np.einsum("nd,nod->no", obs, weights[who]) + biases[who]
            return outputs_to_actions(raw, wm.action_space)

        rng = np.random.default_rng([config.seed, generation])
        tau = rng.uniform(*config.temperature_range, size=len(owner)) if config.temperature_range else temperature
        returns, _ = dream_returns(wm, policy, len(owner), tau, rng, config.max_steps, config.done_mode, config.done_threshold,
                                   config.obs_mode, starts)
        fitness = returns.reshape(len(candidates), config.rollouts).mean(1)
        es.tell(list(asked), list(-fitness))  # the float64 solutions it asked for
        generation += 1
        history.append({"generation": generation, "mean": float(fitness.mean()), "best": float(fitness.max())})
        state = {"generation": generation, "mean": es.mean.tolist(), "sigma": float(es.sigma), "history": history}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_path)
        bar.update(1)
        bar.set_postfix(mean=f"{fitness.mean():.1f}", best=f"{fitness.max():.1f}")
    bar.close()
    info = {"env_id": wm.env_id, "bundle_fingerprint": wm.fingerprint, "trained_in": "dream", "obs_mode": config.obs_mode,
            "temperature": temperature if config.temperature_range is None else list(config.temperature_range),
            "cmaes": asdict(config), "history": history}
    controller = LinearController.from_flat(np.asarray(state["mean"]), obs_dim, wm.action_space, info)
    controller.save(out)
    return controller
