"""How closely can the paper's linear controller follow an agent on real states? Fits linear maps to the agent's choices.

Follows every state of the `--train` and `--held` games as RealEnv sees them (the controller's observation, e.g.
[z, c, h]), asks the agent for its action probabilities there, fits linear maps to its choices as DAgger's fit does
(Adam, cross-entropy, an L2 penalty on W) with each `--fits` setting, and prints how often each map, and `--controllers`,
chooses the agent's action on the training and held-out states, and on the states where the agent is sure (its
choice's probability above 0.8). docs/agents.md, "Without the weight penalty", has its table for TakeCover.

    python examples/linear_imitation.py --train A.h5 B.h5 --held OWN.h5 --controllers VizdoomTakeCover \\
        --fits 2400:1e-4 10000:0
"""
import argparse
import time

import numpy as np
import torch

from dreamenv import load_world_model
from dreamenv.agents.controller import LinearController
from dreamenv.agents.dagger import DAggerConfig, imitation_loss, teacher_view
from dreamenv.agents.starts import real_start_bank
from dreamenv.compare import load_policy
from dreamenv.envs.dream import dream_core
from dreamenv.registry import resolve_controller

SURE = 0.8


@torch.inference_mode()
def agent_probabilities(agent, obs: np.ndarray, obs_mode: str, world_model) -> np.ndarray:
    """The agent's action probabilities (an ensemble's: the mean of its members') on the controller's observations."""
    members = getattr(agent, "members", [agent])
    view = torch.from_numpy(teacher_view(obs, obs_mode, agent.obs_mode, world_model))
    return torch.stack([m.head.distribution(m.actor(view)).probs for m in members]).mean(0).numpy()


def real_states(world_model, agent, stores: list[str], obs_mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Every state of the stores' games in the controller's observation, and the agent's probabilities there."""
    started = time.time()
    states, _ = real_start_bank(world_model, 10**9, np.random.default_rng(0), True, stores)
    obs = dream_core(world_model).observe(states, obs_mode).astype(np.float32)
    probs = np.concatenate([agent_probabilities(agent, obs[i : i + 8192], obs_mode, world_model)
                            for i in range(0, len(obs), 8192)])
    print(f"{len(obs)} states of {', '.join(stores)} in {time.time() - started:.0f} s")
    return obs, probs


def fit(obs: np.ndarray, choices: np.ndarray, space, steps: int, weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
    """A linear map fitted to the agent's choices as DAgger fits it (its loss, optimiser and batch), from zero."""
    config = DAggerConfig(teacher="agent")
    torch.manual_seed(0)
    x, y = torch.from_numpy(obs), torch.from_numpy(choices + int(space.start))
    weight = torch.zeros(int(space.n), obs.shape[1], requires_grad=True)
    bias = torch.zeros(len(weight), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=config.learning_rate)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (config.batch_size,))
        loss = imitation_loss(x[rows] @ weight.T + bias, y[rows], space) + weight_decay * (weight ** 2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weight.detach().numpy(), bias.detach().numpy()


def agreement(weight: np.ndarray, bias: np.ndarray, obs: np.ndarray, probs: np.ndarray) -> str:
    """How often the map chooses the agent's action: on all states, and where the agent is sure."""
    same = (obs @ weight.T + bias).argmax(1) == probs.argmax(1)
    sure = probs.max(1) > SURE
    return f"{same.mean():.1%} (sure: {same[sure].mean():.1%} of {sure.mean():.0%})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="VizdoomTakeCover", help="bundle directory or shipped name")
    p.add_argument("--agent", default="VizdoomTakeCover", help="actor-critic train-agent directory or shipped name")
    p.add_argument("--train", nargs="+", required=True, help="rollout stores whose states the maps are fitted on")
    p.add_argument("--held", nargs="+", required=True, help="rollout stores of held-out games")
    p.add_argument("--obs-mode", default="latent_cell", help="the controller's observation")
    p.add_argument("--controllers", nargs="*", default=[], help="saved controllers to score beside the fits")
    p.add_argument("--fits", nargs="*", default=["2400:1e-4", "10000:0"], help="STEPS:L2 of each fit")
    args = p.parse_args()

    world_model = load_world_model(args.bundle)
    agent = load_policy(args.agent, "actor-critic", world_model)
    train_obs, train_probs = real_states(world_model, agent, args.train, args.obs_mode)
    held_obs, held_probs = real_states(world_model, agent, args.held, args.obs_mode)
    for name in args.controllers:
        controller = LinearController.load(resolve_controller(name))
        print(f"{name}: training games {agreement(controller.weight, controller.bias, train_obs, train_probs)}, "
              f"held out {agreement(controller.weight, controller.bias, held_obs, held_probs)}")
    for setting in args.fits:
        steps, weight_decay = setting.split(":")
        weight, bias = fit(train_obs, train_probs.argmax(1), world_model.action_space, int(steps), float(weight_decay))
        print(f"{steps} steps, L2 {weight_decay}: training games {agreement(weight, bias, train_obs, train_probs)}, "
              f"held out {agreement(weight, bias, held_obs, held_probs)}")


if __name__ == "__main__":
    main()
