"""Could the agent have dodged the deaths it met in the game, and does M know? Replay and branch each death.

    python examples/dodge_in_game.py --episodes 20 --json dodge.json

The agent plays real episodes. For each one that ends in a death at step T and each k in --before, the game is
replayed from its seed with the agent's own actions up to step T - k (VizDoom replays a seed and an action sequence
exactly), and then continued with other actions: the agent's own, always nothing, always left, always right, and
random actions held 1..10 steps. Each option counts as survived if it is alive `--after` steps past T. From the same
real state M imagines the same options (`--samples` dreams each, tau 1.0) and gives each its chance of being alive
then. `--judge BUNDLE` asks another M of the same V instead, following the same real episodes. The summary: how
often some option survives in the game, how often M's favourite does, and the rank correlation between M's chances
and the game's lifetimes. Discrete-action MDN-RNN bundles only.
"""
import argparse
import json
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch

import dreamenv
from dreamenv.data.collect import _brownian_policy
from dreamenv.data.sources import make_source_env
from dreamenv.envs.dream import DreamCore, DreamState
from dreamenv.train import vae_digest


def options(space: gym.spaces.Discrete, actions: list[int]) -> dict[str, Callable[[], Callable[[int], int]]]:
    """Name -> a maker of a fresh step -> action function: the agent's recorded actions (then the first action, which
    only M plays: in the game they end in the death), each action always, and random actions held 1..10 steps (the
    brownian policy of `dreamenv collect`)."""
    choices = range(int(space.start), int(space.start) + int(space.n))
    made = {"agent": lambda: (lambda step: actions[step] if step < len(actions) else choices[0])}
    made.update({f"always {a}": (lambda a=a: (lambda step: a)) for a in choices})
    made.update({f"held random {j}": (lambda j=j: brownian(space, j)) for j in range(3)})
    return made


def brownian(space: gym.spaces.Discrete, seed: int) -> Callable[[int], int]:
    """The brownian collection policy as a step -> action function."""
    act = _brownian_policy(space, np.random.default_rng(seed))
    return lambda step: act(None, None)


def game_lives(env, seed: int, prefix: list[int], act: Callable[[int], int], budget: int) -> int:
    """Steps the game lives (up to budget) after replaying `prefix` from `seed` and then acting with `act`."""
    env.reset(seed=seed)
    for a in prefix:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            raise RuntimeError(f"seed {seed}: the replay ended before the branch point; the game is not deterministic")
    for step in range(budget):
        _, _, terminated, truncated, _ = env.step(act(step))
        if terminated:
            return step + 1
        if truncated:
            return budget
    return budget


@torch.inference_mode()
def m_alive(core: DreamCore, wm, real: DreamState, make: Callable, budget: int, samples: int,
            rng: np.random.Generator) -> float:
    """M's chance, averaged over `samples` dreams at tau 1.0, of being alive `budget` steps after the real state."""
    state, alive = DreamState(*(x.repeat(samples, 1) for x in real)), np.ones(samples)
    acts = [make() for _ in range(samples)]
    for step in range(budget):
        a = np.array([act(step) for act in acts])
        state, _, _ = core.step(state, wm.encode_actions(a), 1.0, core.draw_noise(rng, samples), "threshold", 2.0)
        alive = alive * (1.0 - core.done_probability(state))
    return float(alive.mean())


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):
        r[x == value] = r[x == value].mean()
    return r


def summarise(rows: list[dict], after: int) -> None:
    """Per k: share of deaths some other option survives, share M's favourite survives (and an option picked at
    random), mean rank correlation of M's chances and the game's lifetimes."""
    for k in sorted({r["k"] for r in rows}):
        at = [r for r in rows if r["k"] == k]
        others = [name for name in at[0]["game"] if name != "agent"]
        some = np.mean([any(r["game"][o] > k + after - 1 for o in others) for r in at])
        favourite = np.mean([r["game"][max(others, key=lambda o: r["m_alive"][o])] > k + after - 1 for r in at])
        any_one = np.mean([r["game"][o] > k + after - 1 for r in at for o in others])
        corr = [np.corrcoef(ranks(np.array(list(r["game"].values()), float)),
                            ranks(np.array(list(r["m_alive"].values()))))[0, 1]
                for r in at if len(set(r["game"].values())) > 1]
        agent = np.mean([r["m_alive"]["agent"] for r in at])
        rest = np.mean([r["m_alive"][o] for r in at for o in others])
        print(f"{k} steps before: {len(at)} deaths; some other option lives in the game {some:.0%}, M's favourite "
              f"{favourite:.0%} (one at random {any_one:.0%}); M's chance for the agent's own (fatal) actions "
              f"{agent:.2f}, for the others {rest:.2f}; rank correlation of M and the game over the options "
              f"{np.mean(corr):+.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", default="VizdoomTakeCover", help="bundle directory or shipped name")
    parser.add_argument("--agent", default="VizdoomTakeCover", help="agent directory or shipped name")
    parser.add_argument("--episodes", type=int, default=20, help="real episodes, seeds 0..episodes-1")
    parser.add_argument("--before", default="5,10,20,40", help="branch this many steps before each death")
    parser.add_argument("--after", type=int, default=30, help="an option survives if alive this many steps past the death")
    parser.add_argument("--judge", help="the bundle whose M imagines the options (default: --bundle's); same V")
    parser.add_argument("--samples", type=int, default=32, help="M's dreams per option")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wm = dreamenv.load_world_model(args.bundle)
    if wm.model_kind != "mdnrnn" or not hasattr(wm.action_space, "n"):
        raise ValueError(f"{args.bundle}: this example needs an MDN-RNN bundle with Discrete actions")
    judge = dreamenv.load_world_model(args.judge) if args.judge else wm
    if judge.model_kind != "mdnrnn" or vae_digest(judge.vae) != vae_digest(wm.vae):
        raise ValueError(f"--judge {args.judge}: needs an MDN-RNN bundle with the same V as {args.bundle}")
    core, rng = DreamCore(judge), np.random.default_rng(0)
    agent = dreamenv.load_agent(args.agent, args.bundle)
    real = dreamenv.make_real(args.bundle, obs_mode="latent_cell")
    game = make_source_env(wm.env_id)
    zd, hid = wm.z_dim, wm.hidden_size
    rows = []
    for seed in range(args.episodes):
        obs, _ = real.reset(seed=seed)
        h = c = torch.zeros(1, judge.hidden_size)
        seen, actions, done = [], [], False
        while not done:  # the judge's M follows the same real latents z_t and actions
            z = torch.from_numpy(obs[None, :zd])
            seen.append(DreamState(z, h, c))
            seen_by_agent = obs if agent.obs_mode == "latent_cell" else np.concatenate([obs[:zd], obs[zd + hid:]])
            action = int(agent.predict(seen_by_agent, deterministic=True)[0])
            with torch.inference_mode():
                h, c = judge.mdnrnn.step(z, judge.encode_actions(np.array([action])), h, c)
            obs, _, terminated, truncated, _ = real.step(action)
            actions.append(action)
            done = terminated or truncated
        print(f"seed {seed}: {'died at' if terminated else 'alive at'} {len(actions)}", flush=True)
        if not terminated:
            continue
        for k in (int(x) for x in args.before.split(",")):
            branch = len(actions) - k
            if branch <= 0:
                continue
            row = {"seed": seed, "death": len(actions), "k": k, "game": {}, "m_alive": {}}
            for name, make in options(wm.action_space, actions[branch:]).items():
                row["game"][name] = game_lives(game, seed, actions[:branch], make(), k + args.after)
                row["m_alive"][name] = m_alive(core, judge, seen[branch], make, k + args.after, args.samples, rng)
            rows.append(row)
    with open(args.json, "w") as out:
        json.dump({"args": vars(args), "rows": rows}, out)
    summarise(rows, args.after)


if __name__ == "__main__":
    main()
