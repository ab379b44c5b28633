"""A Dreamer-style actor-critic learned in imagination (DreamerV3's recipe, Discrete actions).

Actor and critic are MLPs on the latent observation. Each update imagines `horizon` steps of `batch` dreams (one
DreamVectorEnv batch) with the current actor; the dreams go on from where the last update left them and restart
from the bundle's initial-state bank when M ends them, so starts cover whole episodes, not only their first steps.
Lambda-returns bootstrap from a slow target critic; the critic regresses them in symlog space; the actor follows
REINFORCE with advantages divided by max(1, EMA of the returns' 5th-95th percentile range), plus an entropy bonus.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dreamenv.agents.saved import check_agent_bundle, read_agent_info, write_agent_info
from dreamenv.checkpointing import load_checkpoint, save_checkpoint
from dreamenv.config import config_from_table
from dreamenv.registry import load_world_model, resolve_bundle
from dreamenv.spaces import space_from_json, space_to_json

WEIGHTS_FILE = "actor_critic.safetensors"


@dataclass
class ActorCriticConfig:
    """Imagination training; entropy scale, return percentiles, target-critic rate and unimix are DreamerV3's."""

    iterations: int = 5000  # updates, each on batch x horizon imagined steps
    batch: int = 256  # dreams imagined side by side
    horizon: int = 15  # imagined steps per update
    gamma: float = 0.997  # DreamerV3: 1 - 1/333
    lam: float = 0.95
    hidden: int = 256
    layers: int = 2
    actor_lr: float = 1e-4
    critic_lr: float = 1e-4
    entropy: float = 3e-4  # scale of the entropy bonus
    target_rate: float = 0.02  # the target critic moves this fraction towards the critic after each update
    return_decay: float = 0.99  # EMA of the returns' 5th-95th percentile range
    unimix: float = 0.01  # mix of the uniform distribution into the actor's
    temperature: float | None = None  # None: the bundle's default
    done_mode: str = "sample"
    done_threshold: float = 0.5
    checkpoint_every: int = 250  # updates between checkpoints; a rerun resumes from the last one
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch", "horizon", "hidden", "layers", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lam <= 1, got gamma {self.gamma}, lam {self.lam}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActorCriticConfig":
        """A config from a recipe's [actor_critic] table; unknown keys are an error that lists the known ones."""
        return config_from_table(cls, data, "actor-critic")


def mlp(inputs: int, outputs: int, hidden: int, layers: int) -> nn.Sequential:
    """DreamerV3's MLP: `layers` x (Linear, LayerNorm, SiLU), then a linear output."""
    blocks: list[nn.Module] = []
    for index in range(layers):
        blocks += [nn.Linear(inputs if index == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.SiLU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, outputs))


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): squashes large returns so one regression fits every reward scale."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """The inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


def lambda_returns(
    rewards: torch.Tensor, terminated: torch.Tensor, ended: torch.Tensor, next_values: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """TD(lambda) returns of (horizon, batch) imagined steps, computed backwards.

    R_t = r_t + gamma (1 - terminated_t) ((1 - lam) v(s_t+1) + lam R_t+1), where v(s_t+1) is the value of step t's
    successor and R_t+1 is replaced by v(s_t+1) after the last step and where an episode ended (the next row then
    belongs to a new episode).
    """
    returns = torch.empty_like(rewards)
    following = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        following = torch.where(ended[t], next_values[t], following)
        following = rewards[t] + gamma * (~terminated[t]).to(rewards.dtype) * ((1 - lam) * next_values[t] + lam * following)
        returns[t] = following
    return returns


class ActorCritic(nn.Module):
    """Actor (action logits), critic (symlog value) and its slow copy, the target critic."""

    def __init__(self, obs_dim: int, actions: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.actor = mlp(obs_dim, actions, hidden, layers)
        self.critic = mlp(obs_dim, 1, hidden, layers)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    def policy(self, obs: torch.Tensor, unimix: float) -> torch.distributions.Categorical:
        """The actor's distribution, with `unimix` of the uniform mixed in (no action's probability reaches zero)."""
        probs = torch.softmax(self.actor(obs), -1)
        return torch.distributions.Categorical(probs=(1 - unimix) * probs + unimix / probs.shape[-1])

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """Move the target critic `rate` of the way towards the critic."""
        for target, source in zip(self.target_critic.parameters(), self.critic.parameters()):
            target.lerp_(source, rate)


class ActorCriticPolicy:
    """The trained actor as a policy: predict(obs, deterministic=True) -> (action, None), SB3-style."""

    def __init__(self, actor: nn.Module, action_space: gym.spaces.Discrete, info: dict[str, Any] | None = None) -> None:
        self.actor = actor
        self.action_space = action_space
        self.info = info or {}

    @torch.inference_mode()
    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """The most likely action (deterministic) or a sample, for one observation or a batch."""
        obs = torch.as_tensor(np.asarray(observation, np.float32))
        logits = self.actor(obs.reshape(-1, obs.shape[-1]))
        index = logits.argmax(-1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        actions = index.numpy().astype(np.int64) + int(self.action_space.start)
        return (actions[0] if obs.ndim == 1 else actions), None

    def save(self, path: str | Path) -> None:
        """Write the actor's weights as safetensors, with its shape and action space as JSON metadata."""
        linear = [m for m in self.actor if isinstance(m, nn.Linear)]
        meta = {"obs_dim": linear[0].in_features, "hidden": linear[0].out_features, "layers": len(linear) - 1,
                "action_space": space_to_json(self.action_space)}
        save_file({k: v.contiguous() for k, v in self.actor.state_dict().items()}, str(Path(path) / WEIGHTS_FILE),
                  metadata={"actor": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "ActorCriticPolicy":
        """The policy saved in a `dreamenv train-agent --algo actor-critic` directory."""
        from safetensors import safe_open

        weights = Path(path) / WEIGHTS_FILE
        with safe_open(str(weights), "pt") as handle:
            meta = json.loads(handle.metadata()["actor"])
        space = space_from_json(meta["action_space"])
        actor = mlp(meta["obs_dim"], int(space.n), meta["hidden"], meta["layers"])
        actor.load_state_dict(load_file(str(weights)))
        return cls(actor, space, read_agent_info(path))


def train_actor_critic(
    bundle: str | Path, out: str | Path, config: ActorCriticConfig | None = None, progress: bool = True
) -> ActorCriticPolicy:
    """Learn a policy in imagination (Discrete actions); writes out/actor_critic.safetensors + out/agent.json and
    resumes from out/train/ (model and optimiser checkpoint)."""
    from dreamenv.envs.vector import DreamVectorEnv

    config = config or ActorCriticConfig()
    wm = load_world_model(bundle)
    space = wm.action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise ValueError(f"the actor-critic learns Discrete actions (REINFORCE), this bundle acts in {space}: "
                         "train PPO instead (dreamenv train-agent BUNDLE --algo ppo)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "agent.json").is_file():
        check_agent_bundle(read_agent_info(out), wm, out)
    temperature = wm.default_temperature if config.temperature is None else float(config.temperature)
    torch.manual_seed(config.seed)
    env = DreamVectorEnv(config.batch, wm, temperature=temperature, done_mode=config.done_mode,
                         done_threshold=config.done_threshold, autoreset_mode="SameStep")
    model = ActorCritic(wm.latent_obs_dim, int(space.n), config.hidden, config.layers)
    optimizer = torch.optim.Adam([{"params": model.actor.parameters(), "lr": config.actor_lr},
                                  {"params": model.critic.parameters(), "lr": config.critic_lr}], eps=1e-5)
    state = load_checkpoint(out / "train", model, optimizer) or {"iteration": 0, "return_range": 0.0, "history": []}
    source = str(resolve_bundle(bundle)) if Path(bundle).exists() else str(bundle)  # shipped names stay names
    obs, _ = env.reset(seed=config.seed + state["iteration"])
    episode_return, finished = np.zeros(config.batch), []

    def save() -> None:
        save_checkpoint(out / "train", model, optimizer, state)
        ActorCriticPolicy(model.actor, space).save(out)
        write_agent_info(out, "actor-critic", wm, source, {"temperature": temperature, "iterations": state["iteration"],
                                                            "config": asdict(config), "history": state["history"]})

    bar = tqdm(total=config.iterations, initial=min(state["iteration"], config.iterations), unit="update",
               desc=f"actor-critic in the dream, tau={temperature:g}", disable=not progress)
    while state["iteration"] < config.iterations:
        steps = {"obs": [], "actions": [], "rewards": [], "terminated": [], "ended": [], "successors": []}
        for _ in range(config.horizon):  # imagine with the current actor
            with torch.no_grad():
                actions = model.policy(torch.from_numpy(obs), config.unimix).sample().numpy()
            following, rewards, terminated, truncated, infos = env.step(actions + int(space.start))
            ended = terminated | truncated
            successors = np.where(ended[:, None], infos["final_obs"], following) if ended.any() else following
            for key, value in zip(steps, (obs, actions, rewards, terminated, ended, successors)):
                steps[key].append(torch.as_tensor(value))
            episode_return += rewards
            finished.extend(episode_return[ended].tolist())
            episode_return[ended] = 0.0
            obs = following
        batch = {key: torch.stack(values) for key, values in steps.items()}
        with torch.no_grad():
            next_values = symexp(model.target_critic(batch["successors"]).squeeze(-1))
            returns = lambda_returns(batch["rewards"].float(), batch["terminated"], batch["ended"], next_values,
                                     config.gamma, config.lam)
            low, high = torch.quantile(returns.flatten(), torch.tensor([0.05, 0.95]))
            decay = config.return_decay if state["iteration"] else 0.0
            state["return_range"] = decay * state["return_range"] + (1 - decay) * float(high - low)
        critic_out = model.critic(batch["obs"]).squeeze(-1)
        advantage = (returns - symexp(critic_out.detach())) / max(1.0, state["return_range"])
        dist = model.policy(batch["obs"], config.unimix)
        actor_loss = -(advantage * dist.log_prob(batch["actions"])).mean() - config.entropy * dist.entropy().mean()
        critic_loss = (critic_out - symlog(returns)).pow(2).mean()
        optimizer.zero_grad()
        (actor_loss + critic_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        model.update_target(config.target_rate)
        state["iteration"] += 1
        bar.update(1)
        if finished:
            bar.set_postfix(dream_return=f"{np.mean(finished[-100:]):.1f}", refresh=False)
        if state["iteration"] % config.checkpoint_every == 0 or state["iteration"] == config.iterations:
            state["history"].append({"iteration": state["iteration"], "imagined_reward": float(batch["rewards"].mean()),
                                     "dream_return": float(np.mean(finished[-100:])) if finished else None})
            save()
    bar.close()
    return ActorCriticPolicy.load(out)
