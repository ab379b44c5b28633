"""Decision-time lookahead with M: before each real step, imagine the next H steps from the real state for every
first action (the agent acting after it) and switch from the agent's action when M expects another to live longer.

    python examples/lookahead_in_game.py --episodes 20 --margin 0.5 --json lookahead.json
    python examples/lookahead_in_game.py --episodes 6 --diagnose --json diagnose.json

Short dreams from real states stay close to the game (docs/results.md), so M might see a fireball coming that the
agent ignores. The value of a first action is M's expected number of steps alive out of H, the mean over `samples`
dreams (the same random numbers for every first action). The lookahead is asked only when the agent's own action
expects to lose more than `margin` steps, and overrides it only for a gain of more than `margin`. With --diagnose
the agent plays unchanged and every step's values are recorded, to see whether M expects the deaths that come.
Discrete-action MDN-RNN bundles only; the real env runs with obs_mode "latent_cell", since dreaming on needs c.
"""
import argparse
import json

import numpy as np
import torch

import dreamenv
from dreamenv.compare import bootstrap_ci
from dreamenv.envs.dream import DreamCore, DreamState
from dreamenv.envs.noise import Noise


class Lookahead:
    """M's expected steps alive over `horizon` for given first actions, from a real [z, c, h] observation."""

    def __init__(self, bundle: str, agent: str, horizon: int, samples: int, temperature: float, seed: int = 0) -> None:
        self.wm = dreamenv.load_world_model(bundle)
        self.core = DreamCore(self.wm)
        self.agent = dreamenv.load_agent(agent, bundle)
        if not hasattr(self.agent, "actor") or self.agent.obs_mode != "latent":
            raise ValueError(f"{agent}: this example dreams on with one actor-critic that reads [z, h] (obs_mode 'latent')")
        self.horizon, self.samples, self.temperature = horizon, samples, temperature
        self.z_dim, self.hidden = self.wm.z_dim, self.wm.hidden_size
        self.rng = np.random.default_rng(seed)

    def agent_action(self, obs: np.ndarray) -> int:
        """The agent's deterministic action on the [z, h] part of obs."""
        return int(self.agent.predict(np.concatenate([obs[: self.z_dim], obs[self.z_dim + self.hidden :]]))[0])

    @torch.inference_mode()
    def values(self, obs: np.ndarray, firsts: list[int]) -> np.ndarray:
        """Expected steps alive (of horizon) after each first action, the agent acting on."""
        n, k, zd, hid = len(firsts), self.samples, self.z_dim, self.hidden
        z, c, h = (torch.from_numpy(obs[None, part]).repeat(n * k, 1)
                   for part in (slice(0, zd), slice(zd, zd + hid), slice(zd + hid, None)))
        state, alive, value = DreamState(z, h, c), np.ones(n * k), np.zeros(n * k)
        actions = np.repeat(np.asarray(firsts), k)
        actor, head = self.agent.actor, self.agent.head
        for step in range(self.horizon):
            shared = self.core.draw_noise(self.rng, k)  # common random numbers across the first actions
            noise = Noise(*(np.tile(x, (n,) + (1,) * (x.ndim - 1)) for x in shared))
            state, _, _ = self.core.step(state, self.wm.encode_actions(actions), self.temperature, noise, "threshold", 2.0)
            alive = alive * (1.0 - self.core.done_probability(state))
            value += alive
            if step + 1 < self.horizon:
                actions = head.to_env(head.mode(actor(torch.cat([state.z, state.h], 1))))
        return value.reshape(n, k).mean(1)


def summarise(trace: list[dict], horizon: int, start: int, before: int = 30) -> None:
    """For each death: the largest expected loss of the agent's action (risk, steps of horizon) and the largest gain of
    another first action over the last `before` steps, with how many steps before the death each came."""
    for episode in trace:
        if not episode["died"]:
            continue
        rows = np.array(episode["values"][-before:])
        actions, values = rows[:, 0].astype(int), rows[:, 1:]
        mine = values[np.arange(len(rows)), actions - start]
        risk, gain = horizon - mine, values.max(1) - mine
        print(f"seed {episode['seed']}: risk max {risk.max():.1f} at {len(rows) - risk.argmax()} steps before the death, "
              f"gain max {gain.max():.1f} at {len(rows) - gain.argmax()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default="VizdoomTakeCover", help="bundle directory or shipped name")
    parser.add_argument("--agent", default="VizdoomTakeCover", help="actor-critic agent directory or shipped name")
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16, help="imagined dreams per first action")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--margin", type=float, default=0.5, help="expected steps the agent's action must lose, and another gain")
    parser.add_argument("--episodes", type=int, default=20, help="real episodes, seeds 0..episodes-1")
    parser.add_argument("--diagnose", action="store_true", help="play the agent unchanged; record every step's values")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    look = Lookahead(args.bundle, args.agent, args.horizon, args.samples, args.temperature)
    space = look.wm.action_space
    every = list(range(int(space.start), int(space.start) + int(space.n)))
    env = dreamenv.make_real(args.bundle, obs_mode="latent_cell")
    scores, overrides, trace = [], [], []
    for seed in range(args.episodes):
        obs, _ = env.reset(seed=seed)
        total, done, steps, switched, values = 0.0, False, 0, 0, []
        while not done:
            action = look.agent_action(obs)
            if args.diagnose:
                values.append([action, *look.values(obs, every).round(3).tolist()])
            elif args.horizon - look.values(obs, [action])[0] > args.margin:
                value = look.values(obs, every)
                best = every[int(value.argmax())]
                if best != action and value.max() - value[every.index(action)] > args.margin:
                    action, switched = best, switched + 1
            obs, reward, terminated, truncated, _ = env.step(action)
            total, steps, done = total + reward, steps + 1, terminated or truncated
        scores.append(total)
        overrides.append(switched)
        trace.append({"seed": seed, "died": bool(terminated), "values": values})
        print(f"seed {seed}: {total:.0f} ({steps} steps, {switched} overrides)", flush=True)
    x = np.array(scores)
    result = {"args": vars(args), "seed": 0, "actual": {"scores": scores, "mean": float(x.mean()),
                                                         "ci95": [float(v) for v in bootstrap_ci(x)], "overrides": overrides}}
    if args.diagnose:
        result["trace"] = trace
        summarise(trace, args.horizon, int(space.start))
    with open(args.json, "w") as out:
        json.dump(result, out)
    print(f"mean {x.mean():.1f} {np.round(bootstrap_ci(x), 1)}")


if __name__ == "__main__":
    main()
