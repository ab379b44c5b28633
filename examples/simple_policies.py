"""How dreams score simple policies (each constant action, uniform random) against the game: a quick look at what a
dream overrates before an agent is trained in it. Discrete action spaces only.

    python examples/simple_policies.py VizdoomTakeCover runs/acround/bundle --episodes 50 --real

Each policy plays the same seeds in every dream (and, with --real, once in the game: it does not depend on the bundle).
"""
import argparse

import gymnasium as gym
import numpy as np

import dreamenv


class Constant:
    """Always the same action."""

    def __init__(self, action: int) -> None:
        self.action = action

    def __call__(self, obs: np.ndarray) -> int:
        return self.action


class Uniform:
    """A uniformly random action from a seeded generator."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.rng = n, np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray) -> int:
        return int(self.rng.integers(self.n))


parser = argparse.ArgumentParser()
parser.add_argument("bundles", nargs="+", help="bundle directories or shipped names of one env")
parser.add_argument("--episodes", type=int, default=50, help="episodes per policy and dream (seeds 0..episodes-1)")
parser.add_argument("--temperature", type=float, default=1.0, help="dream temperature")
parser.add_argument("--real", action="store_true", help="also play each policy in the game (with the first bundle)")

if __name__ == "__main__":
    args = parser.parse_args()
    space = dreamenv.load_world_model(args.bundles[0]).action_space
    if not isinstance(space, gym.spaces.Discrete):
        raise SystemExit(f"{args.bundles[0]} has {space} actions: this check takes Discrete ones")
    policies = {f"always action {a}": (lambda a=a: Constant(a)) for a in range(space.n)}
    policies["uniform random"] = lambda: Uniform(space.n)
    print("| policy | " + " | ".join(f"dream of {b}" for b in args.bundles) + (" | game |" if args.real else " |"))
    print("| --- " * (len(args.bundles) + 1 + args.real) + "|")
    for name, make in policies.items():
        cells = []
        for k, bundle in enumerate(args.bundles):
            real = args.real and k == 0
            result = dreamenv.compare(make(), bundle, temperatures=[args.temperature], episodes=args.episodes,
                                      backend="serial", real=real, progress=False)
            cells.append(next(iter(result["virtual"].values())))
            if real:
                game = result["actual"]
        row = [f"{c['mean']:.1f} [{c['ci95'][0]:.1f}, {c['ci95'][1]:.1f}]" for c in cells]
        if args.real:
            row.append(f"{game['mean']:.1f} [{game['ci95'][0]:.1f}, {game['ci95'][1]:.1f}]")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)
