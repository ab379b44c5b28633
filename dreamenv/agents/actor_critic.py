"""A Dreamer-style actor-critic learned in imagination (DreamerV3's recipe), for Discrete and Box actions.

Actor and critic are MLPs on the latent observation ([z, h]; obs_mode "latent_cell" adds the MDN-RNN's LSTM cell state
c, as the original World Models code's Doom controller read it). Each update imagines `horizon` steps of `batch`
dreams with the current actor, stepped as one batch by the bundle's dream core. As in DreamerV3, the imagined rollouts
start from latent states of real episodes: the bundle's recorded rollouts, followed by V + M (or the RSSM's posterior)
exactly as RealEnv follows the game. Without readable rollouts the dreams start from the bundle's initial-state bank
and go on from where the last update left them, so the starts still cover whole dream episodes. A dream M ends
restarts from the same kind of start. Lambda-returns bootstrap from a slow target critic; the critic regresses them in
symlog space; the actor follows REINFORCE with advantages divided by max(1, EMA of the returns' 5th-95th percentile
range), plus an entropy bonus. For Box actions, actor_gradient "dynamics" instead backpropagates the lambda-returns
(divided by the same range) through the world model's steps (M's or the RSSM's) into the actions, as DreamerV1 to V3
do for continuous control (dreamenv.agents.dynamics). Discrete actions
come from a categorical with 1% uniform mixed in, Box actions from DreamerV3's bounded normal: mean tanh(.), std in
[0.1, 1], samples clipped to [-1, 1] and mapped linearly onto the Box's [low, high].
"""
from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dreamenv.agents.dynamics import check_dynamics_gradient, imagine_differentiably
from dreamenv.agents.saved import check_agent_bundle, read_agent_info, write_agent_info
from dreamenv.agents.done_critics import DoneCritics
from dreamenv.agents.starts import StartStates, real_start_bank, recorded_rollouts
from dreamenv.checkpointing import load_checkpoint, save_checkpoint
from dreamenv.config import checked_temperature_range, config_from_table
from dreamenv.envs.dream import TRAINING_DONE_MODES, checked_done_mode, dream_core
from dreamenv.envs.spaces import latent_dim
from dreamenv.registry import load_world_model, resolve_bundle
from dreamenv.spaces import space_from_json, space_to_json
from dreamenv.worldmodel import WorldModel

WEIGHTS_FILE = "actor_critic.safetensors"


@dataclass
class ActorCriticConfig:
    """Imagination training; entropy scale, return percentiles, target-critic rate, unimix and the Box actor's std
    bounds are DreamerV3's."""

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
    unimix: float = 0.01  # Discrete: mix of the uniform distribution into the actor's
    min_std: float = 0.1  # Box: the actor's normal has a std in [min_std, max_std] (in units of half the Box's width)
    max_std: float = 1.0
    obs_mode: str = "latent"  # the actor's and critic's input: "latent" = [z, h]; "latent_cell" = [z, c, h] (MDN-RNN only)
    real_starts: bool | None = None  # start from real episodes' states: None = when the bundle's rollouts are readable
    real_start_episodes: int = 64  # real episodes followed to build the start bank (ours: DreamerV3 replays its data)
    start_data: list[str] | None = None  # rollout stores of the real starts (None: the bundle's recorded rollouts)
    temperature: float | None = None  # None: the bundle's default
    temperature_range: tuple[float, float] | None = None  # each dream's tau drawn uniformly from it (overrides temperature)
    done_mode: str = "sample"  # "sample" / "threshold": imagined dreams end as DreamEnv's; "expected": see the module doc
    actor_gradient: str = "reinforce"  # or "dynamics": returns differentiated through the model (Box, expected ends)
    done_threshold: float = 0.5
    done_critics: list[str] | None = None  # bundles (same V) whose Ms also judge each step: 1 - the largest p(done) continues
    checkpoint_every: int = 250  # updates between checkpoints; a rerun resumes from the last one
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch", "horizon", "hidden", "layers", "checkpoint_every", "real_start_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lam <= 1, got gamma {self.gamma}, lam {self.lam}")
        if not 0 < self.min_std <= self.max_std:
            raise ValueError(f"need 0 < min_std <= max_std, got min_std {self.min_std}, max_std {self.max_std}")
        if self.obs_mode not in ("latent", "latent_cell"):
            raise ValueError(f"obs_mode must be 'latent' or 'latent_cell' for the actor-critic, got {self.obs_mode!r}")
        checked_done_mode(self.done_mode, TRAINING_DONE_MODES)
        if self.actor_gradient not in ("reinforce", "dynamics"):
            raise ValueError(f"actor_gradient must be 'reinforce' or 'dynamics', got {self.actor_gradient!r}")
        if self.actor_gradient == "dynamics" and self.done_mode != "expected":
            raise ValueError(f"actor_gradient 'dynamics' discounts by M's p(continue) and draws no deaths, which is "
                             f"done_mode 'expected': set it (--done-mode expected; got {self.done_mode!r})")
        self.temperature_range = checked_temperature_range(self.temperature_range)
        if self.done_critics and (self.done_mode != "expected" or self.actor_gradient != "reinforce"):
            raise ValueError("done_critics discount each imagined step by the largest p(done), which is done_mode "
                             f"'expected' with actor_gradient 'reinforce' (got {self.done_mode!r}, {self.actor_gradient!r})")
        if self.start_data and self.real_starts is False:
            raise ValueError("start_data is where real starts come from: drop it, or drop real_starts = false")

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
    rewards: torch.Tensor, continues: torch.Tensor, ended: torch.Tensor, next_values: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """TD(lambda) returns of (horizon, batch) imagined steps, computed backwards.

    R_t = r_t + gamma c_t ((1 - lam) v(s_t+1) + lam R_t+1), where c_t is 0 where step t terminated and 1 where it did
    not (or M's p(continue)), v(s_t+1) is the value of step t's successor and R_t+1 is replaced by v(s_t+1) after the
    last step and where an episode ended (the next row then belongs to a new episode).
    """
    returns = torch.empty_like(rewards)
    following = next_values[-1]
    for t in reversed(range(rewards.shape[0])):
        following = torch.where(ended[t], next_values[t], following)
        following = rewards[t] + gamma * continues[t] * ((1 - lam) * next_values[t] + lam * following)
        returns[t] = following
    return returns


def alive_weights(continues: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """(horizon, batch) chance that each imagined step is reached: the product of the p(continue) before it within
    its episode (1 at the first step and after a restart), DreamerV2's weights of the actor's and critic's losses."""
    weights = torch.ones_like(continues)
    for t in range(1, continues.shape[0]):
        weights[t] = torch.where(ended[t - 1], torch.ones_like(weights[t]), weights[t - 1] * continues[t - 1])
    return weights


@dataclass(frozen=True)
class ActionHead:
    """The actor's outputs as an action distribution and as env actions: a categorical with `unimix` of the uniform
    for Discrete; for Box, DreamerV3's bounded normal (mean tanh(.), std in [min_std, max_std]) whose samples, in
    [-1, 1] units, are clipped and mapped linearly onto the Box's [low, high]."""

    space: gym.Space
    unimix: float = 0.01
    min_std: float = 0.1
    max_std: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.space, gym.spaces.Box):
            if not (np.all(np.isfinite(self.space.low)) and np.all(np.isfinite(self.space.high))):
                raise ValueError(f"the actor-critic maps its actions into the Box's bounds; {self.space} has infinite bounds")
        elif not isinstance(self.space, gym.spaces.Discrete):
            raise ValueError(f"the actor-critic acts in Discrete or Box spaces, not {self.space}")

    @property
    def outputs(self) -> int:
        """Width of the actor's output: one logit per action, or a mean and a std per Box dimension."""
        if isinstance(self.space, gym.spaces.Discrete):
            return int(self.space.n)
        return 2 * int(np.prod(self.space.shape))

    def distribution(self, out: torch.Tensor) -> torch.distributions.Distribution:
        """The actor's distribution over actions (indices from 0, or Box actions in [-1, 1] units before clipping)."""
        if isinstance(self.space, gym.spaces.Discrete):
            probs = torch.softmax(out, -1)
            return torch.distributions.Categorical(probs=(1 - self.unimix) * probs + self.unimix / probs.shape[-1])
        mean, std = out.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        return torch.distributions.Independent(torch.distributions.Normal(torch.tanh(mean), std), 1)

    def mode(self, out: torch.Tensor) -> torch.Tensor:
        """The most likely action, in the distribution's units."""
        if isinstance(self.space, gym.spaces.Discrete):
            return out.argmax(-1)
        return torch.tanh(out.chunk(2, -1)[0])

    def to_env(self, actions: torch.Tensor) -> np.ndarray:
        """A batch of the distribution's actions as env actions: int64 (N,) with the space's start, or (N, *shape)
        in the Box's dtype, within [low, high]."""
        if isinstance(self.space, gym.spaces.Discrete):
            return actions.numpy().astype(np.int64) + int(self.space.start)
        unit = actions.clamp(-1.0, 1.0).double().numpy().reshape(len(actions), *self.space.shape)
        low, high = self.space.low.astype(np.float64), self.space.high.astype(np.float64)
        return np.clip(low + (unit + 1.0) / 2.0 * (high - low), low, high).astype(self.space.dtype)


class ActorCritic(nn.Module):
    """Actor (the action head's inputs), critic (symlog value) and its slow copy, the target critic."""

    def __init__(self, obs_dim: int, outputs: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.actor = mlp(obs_dim, outputs, hidden, layers)
        self.critic = mlp(obs_dim, 1, hidden, layers)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """Move the target critic `rate` of the way towards the critic."""
        for target, source in zip(self.target_critic.parameters(), self.critic.parameters()):
            target.lerp_(source, rate)


def check_obs_width(obs: torch.Tensor, actor: nn.Sequential, obs_mode: str) -> None:
    """Raise ValueError naming both widths when observations do not fit the actor's input."""
    width = actor[0].in_features
    if obs.ndim not in (1, 2) or obs.shape[-1] != width:
        raise ValueError(f"the actor reads observations of width {width} (obs_mode {obs_mode!r}), one or a batch; got shape "
                         f"{tuple(obs.shape)}: create the env with obs_mode={obs_mode!r} and the agent's bundle")


class ActorCriticPolicy:
    """The trained actor as a policy: predict(obs, deterministic=True) -> (action, None), SB3-style."""

    def __init__(self, actor: nn.Module, head: ActionHead, info: dict[str, Any] | None = None) -> None:
        self.actor = actor
        self.head = head
        self.action_space = head.space
        self.info = info or {}

    @property
    def obs_mode(self) -> str:
        """The observation the actor reads: "latent" ([z, h]) or "latent_cell" ([z, c, h])."""
        return self.info.get("obs_mode", "latent")

    @torch.inference_mode()
    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """The most likely action (deterministic) or a sample, for one observation or a batch."""
        obs = torch.as_tensor(np.asarray(observation, np.float32))
        check_obs_width(obs, self.actor, self.obs_mode)
        out = self.actor(obs.reshape(-1, obs.shape[-1]))
        actions = self.head.to_env(self.head.mode(out) if deterministic else self.head.distribution(out).sample())
        return (actions[0] if obs.ndim == 1 else actions), None

    def save(self, path: str | Path) -> None:
        """Write the actor's weights as safetensors, with its shape, action space and head as JSON metadata."""
        linear = [m for m in self.actor if isinstance(m, nn.Linear)]
        meta = {"obs_dim": linear[0].in_features, "hidden": linear[0].out_features, "layers": len(linear) - 1,
                "action_space": space_to_json(self.head.space),
                "head": {"unimix": self.head.unimix, "min_std": self.head.min_std, "max_std": self.head.max_std}}
        save_file({k: v.contiguous() for k, v in self.actor.state_dict().items()}, str(Path(path) / WEIGHTS_FILE),
                  metadata={"actor": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "ActorCriticPolicy":
        """The policy saved in a `dreamenv train-agent --algo actor-critic` directory."""
        from safetensors import safe_open

        weights = Path(path) / WEIGHTS_FILE
        with safe_open(str(weights), "pt") as handle:
            meta = json.loads(handle.metadata()["actor"])
        head = ActionHead(space_from_json(meta["action_space"]), **meta.get("head", {}))
        actor = mlp(meta["obs_dim"], head.outputs, meta["hidden"], meta["layers"])
        actor.load_state_dict(load_file(str(weights)))
        return cls(actor, head, read_agent_info(path))


def actor_critic_losses(model: ActorCritic, head: ActionHead, batch: dict[str, torch.Tensor], config: ActorCriticConfig,
                        state: dict[str, Any], dynamics: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The actor's and the critic's loss on a (horizon, batch) imagined batch; updates state["return_range"].

    REINFORCE (a batch without a graph): advantage x log-prob of the actions taken. Dynamics (a batch built in the
    graph by dreamenv.agents.dynamics): the lambda-returns themselves, whose gradient runs back through the world
    model into the actions. Both divide by max(1, return range) and add the entropy bonus; the critic regresses the returns in
    symlog space.
    """
    next_values = symexp(model.target_critic(batch["successors"]).squeeze(-1))
    returns = lambda_returns(batch["rewards"].float(), batch["continues"], batch["ended"], next_values, config.gamma,
                             config.lam)
    weights = alive_weights(batch["continues"].detach(), batch["ended"])  # all 1 with sampled ends
    target = returns.detach()
    counted = target.flatten()
    if "valid" in batch:  # steps past the env's step limit count for nothing
        weights, counted = weights * batch["valid"], target[batch["valid"]]
    low, high = torch.quantile(counted, torch.tensor([0.05, 0.95]))
    decay = config.return_decay if state["iteration"] else 0.0
    state["return_range"] = decay * state["return_range"] + (1 - decay) * float(high - low)
    scale = max(1.0, state["return_range"])
    critic_out = model.critic(batch["obs"].detach()).squeeze(-1)
    dist = head.distribution(model.actor(batch["obs"].detach()))
    if dynamics:
        objective = returns / scale
    else:
        objective = (target - symexp(critic_out.detach())) / scale * dist.log_prob(batch["actions"])
    actor_loss = -(weights * (objective + config.entropy * dist.entropy())).mean()
    critic_loss = (weights * (critic_out - symlog(target)).pow(2)).mean()
    return actor_loss, critic_loss


def train_actor_critic(
    bundle: str | Path, out: str | Path, config: ActorCriticConfig | None = None, progress: bool = True
) -> ActorCriticPolicy:
    """Learn a policy in imagination (Discrete or Box actions); writes out/actor_critic.safetensors + out/agent.json
    and resumes from out/train/ (model and optimiser checkpoint).

    config.real_starts None starts every update from real episodes' states when the bundle's recorded rollouts (or
    config.start_data) are readable here, and otherwise (with a warning) from the initial-state bank; True makes
    missing rollouts an error, False always uses the initial-state bank. agent.json's "starts" says which one ran.
    """
    config = config or ActorCriticConfig()
    wm = load_world_model(bundle)
    head = ActionHead(wm.action_space, config.unimix, config.min_std, config.max_std)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    obs_dim = latent_dim(wm, config.obs_mode)  # ValueError for "latent_cell" on an RSSM bundle
    dynamics = config.actor_gradient == "dynamics"
    if dynamics:
        check_dynamics_gradient(wm)
        (wm.rssm if wm.rssm is not None else wm.mdnrnn).requires_grad_(False)  # the gradient passes through; it stays
    if (out / "agent.json").is_file():
        previous = read_agent_info(out)
        check_agent_bundle(previous, wm, out)
        previous_mode = previous.get("obs_mode", "latent")
        if previous_mode != config.obs_mode:
            raise ValueError(f"{out} holds an actor-critic on obs_mode {previous_mode!r}, not {config.obs_mode!r}: "
                             "resume it with that obs_mode, or train into a new --out")
    temperature = wm.default_temperature if config.temperature is None else float(config.temperature)
    torch.manual_seed(config.seed)
    critics = DoneCritics(wm, config.done_critics) if config.done_critics else None  # refused before the slow bank
    bank = None
    if config.real_starts is not False:
        try:
            bank = real_start_bank(wm, config.real_start_episodes, np.random.default_rng(config.seed), progress,
                                   config.start_data)
        except FileNotFoundError as err:
            if config.real_starts or config.start_data:
                raise ValueError(f"real_starts needs the bundle's rollouts: {err}; set real_starts = false to start "
                                 "from the bundle's initial states") from None
            warnings.warn(f"actor-critic: imagination starts from the bundle's initial states: {err}", stacklevel=2)
    core = dream_core(wm)
    starts = StartStates(core, bank)
    if critics is not None and bank is not None:
        critics.follow_real_starts(config.real_start_episodes, config.seed, config.start_data or recorded_rollouts(wm),
                                   bank[0].z)
    model = ActorCritic(obs_dim, head.outputs, config.hidden, config.layers)
    optimizer = torch.optim.Adam([{"params": model.actor.parameters(), "lr": config.actor_lr},
                                  {"params": model.critic.parameters(), "lr": config.critic_lr}], eps=1e-5)
    state = load_checkpoint(out / "train", model, optimizer) or {"iteration": 0, "return_range": 0.0, "history": []}
    source = str(resolve_bundle(bundle)) if Path(bundle).exists() else str(bundle)  # shipped names stay names
    rng = np.random.default_rng([config.seed, state["iteration"]])
    expected = config.done_mode == "expected"
    step_done_mode = "threshold" if expected else config.done_mode  # with "expected", the step's own draw is unused
    dream, elapsed, tau = None, np.zeros(config.batch, np.int64), None

    def draw_tau(n: int) -> np.ndarray | None:
        """Each new dream's temperature, with a temperature_range (World Models' randomised tau)."""
        return rng.uniform(*config.temperature_range, n).astype(np.float32) if config.temperature_range else None

    episode_return, finished = np.zeros(config.batch), []

    def save() -> None:
        save_checkpoint(out / "train", model, optimizer, state)
        ActorCriticPolicy(model.actor, head).save(out)
        trained_tau = list(config.temperature_range) if config.temperature_range else temperature
        write_agent_info(out, "actor-critic", wm, source, {"temperature": trained_tau, "iterations": state["iteration"],
                                                            "obs_mode": config.obs_mode,
                                                            **starts.info(), "config": asdict(config), "history": state["history"]})

    def imagine_sampled() -> dict[str, torch.Tensor]:
        """`horizon` dream steps with actions sampled from the current actor (REINFORCE's batch); ended dreams restart."""
        nonlocal dream
        steps = {"obs": [], "actions": [], "rewards": [], "continues": [], "ended": [], "successors": []}
        for _ in range(config.horizon):
            obs = core.observe(dream, config.obs_mode)
            with torch.no_grad():
                actions = head.distribution(model.actor(torch.from_numpy(obs))).sample()
            encoded = wm.encode_actions(head.to_env(actions))
            z = dream.z if critics is not None else None  # (an RSSM state has no z; critics need an MDN-RNN)
            dream, rewards, terminated = core.step(dream, encoded, temperature if tau is None else torch.from_numpy(tau),
                                                   core.draw_noise(rng, config.batch), step_done_mode, config.done_threshold)
            if expected:  # the dream runs on; its return is discounted by p(continue) instead
                done = core.done_probability(dream)
                continues = torch.from_numpy(1.0 - (done if critics is None else np.maximum(done, critics.step(z, encoded))))
                terminated = np.zeros(config.batch, bool)
            else:
                continues = torch.from_numpy(~terminated).float()
            elapsed[:] += 1
            ended = terminated | (elapsed >= wm.max_episode_steps)
            successors = core.observe(dream, config.obs_mode)
            if ended.any():  # ended dreams restart at once (their last observation is in successors)
                restart(np.flatnonzero(ended))
            for key, value in zip(steps, (obs, actions, rewards, continues, ended, successors)):
                steps[key].append(torch.as_tensor(value))
        return {key: torch.stack(values) for key, values in steps.items()}

    def imagine_through_m() -> dict[str, torch.Tensor]:
        """`horizon` dream steps in the autograd graph (the dynamics gradient's batch); dreams past the step limit
        restart afterwards."""
        nonlocal dream
        batch, last = imagine_differentiably(wm, type(dream)(*(x.clone() for x in dream)), elapsed, config.horizon,
                                             lambda obs: head.distribution(model.actor(obs)).rsample(),
                                             temperature if tau is None else torch.from_numpy(tau),
                                             [core.draw_noise(rng, config.batch) for _ in range(config.horizon)],
                                             config.obs_mode)
        dream = type(last)(*(x.detach().clone() for x in last))  # the graph keeps `last`; restarts write in place
        elapsed[:] += config.horizon
        restart(np.flatnonzero(elapsed >= wm.max_episode_steps))
        return batch

    def restart(rows: np.ndarray) -> None:
        """Dreams `rows` begin again from fresh starts (and, with a temperature_range, fresh temperatures)."""
        fresh, elapsed[rows], bank_rows = starts.draw_with_rows(len(rows), rng)
        if tau is not None:
            tau[rows] = draw_tau(len(rows))
        with torch.inference_mode():  # MDN-RNN and RSSM states come from inference-mode steps
            for old, new in zip(dream, fresh):
                old[torch.from_numpy(rows)] = new
        if critics is not None:
            critics.restart(rows, bank_rows)

    bar = tqdm(total=config.iterations, initial=min(state["iteration"], config.iterations), unit="update",
               desc=f"actor-critic in the dream, tau={config.temperature_range or temperature}", disable=not progress)
    while state["iteration"] < config.iterations:
        if dream is None or bank is not None:  # with real starts, every update imagines from fresh ones (DreamerV3)
            dream, elapsed, bank_rows = starts.draw_with_rows(config.batch, rng)
            tau = draw_tau(config.batch)
            if critics is not None:
                critics.start(config.batch, bank_rows)
        batch = imagine_through_m() if dynamics else imagine_sampled()
        if bank is None:  # dreams run whole episodes from their first state: their returns are dream scores
            rewards = batch["rewards"].detach() * batch.get("valid", 1.0)
            for step_rewards, ended in zip(rewards.numpy(), batch["ended"].numpy()):
                episode_return += step_rewards
                finished.extend(episode_return[ended].tolist())
                episode_return[ended] = 0.0
        actor_loss, critic_loss = actor_critic_losses(model, head, batch, config, state, dynamics)
        optimizer.zero_grad()
        (actor_loss + critic_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        optimizer.step()
        model.update_target(config.target_rate)
        state["iteration"] += 1
        bar.update(1)
        imagined_reward = float(batch["rewards"].detach().mean())
        bar.set_postfix(imagined_reward=f"{imagined_reward:.3g}",
                        **({"dream_return": f"{np.mean(finished[-100:]):.1f}"} if finished else {}), refresh=False)
        if state["iteration"] % config.checkpoint_every == 0 or state["iteration"] == config.iterations:
            state["history"].append({"iteration": state["iteration"], "imagined_reward": imagined_reward,
                                     "dream_return": float(np.mean(finished[-100:])) if finished else None})
            save()
    bar.close()
    return ActorCriticPolicy.load(out)
