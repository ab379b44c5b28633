"""Does the dream rank simple policies as the game does? Fixed probes scored virtual vs actual with dreamenv.compare.

    python examples/probe_dream.py runs/doom2k/mix/bundle --temperature 1.15 --episodes 100

A dream that a controller can exploit shows up here first: in TakeCover, holding one direction survives
about as long as doing nothing in the game, so a dream that rewards it is wrong about the walls.
"""
import argparse

import numpy as np

import dreamenv


class Constant:
    """Always the same action."""

    def __init__(self, action: int) -> None:
        self.action = action

    def __call__(self, obs: np.ndarray) -> int:
        return self.action


class HeldRandom:
    """Random actions, each held for 1..10 steps (the brownian collection policy for Discrete actions)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.rng, self.action, self.left = n, np.random.default_rng(seed), 0, 0

    def __call__(self, obs: np.ndarray) -> int:
        if self.left == 0:
            self.action, self.left = int(self.rng.integers(self.n)), int(self.rng.integers(1, 11))
        self.left -= 1
        return self.action


if __name__ == "__main__":  # real-game workers import this file
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", help="bundle directory or shipped name (Discrete actions)")
    parser.add_argument("--temperature", type=float, default=1.15)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--done-mode", default="sample", choices=["sample", "threshold"], help="how M's p(done) ends a dream")
    parser.add_argument("--done-threshold", type=float, default=0.5, help="with --done-mode threshold: end when p(done) exceeds this")
    parser.add_argument("--no-real", action="store_true", help="dream only (the game's scores do not depend on the dream)")
    args = parser.parse_args()
    n = dreamenv.load_world_model(args.bundle).action_space.n
    probes = {f"always {a}": Constant(a) for a in range(n)} | {"held random": HeldRandom(n)}
    print("| probe | virtual | actual |\n| --- | --- | --- |")
    for name, policy in probes.items():
        result = dreamenv.compare(policy, args.bundle, [args.temperature], episodes=args.episodes, real=not args.no_real,
                                  done_mode=args.done_mode, done_threshold=args.done_threshold)
        v, a = result["virtual"][f"{args.temperature:g}"], result.get("actual")
        actual = f"{a['mean']:.1f} +- {a['std']:.1f}" if a else "not run"
        print(f"| {name} | {v['mean']:.1f} +- {v['std']:.1f} | {actual} |", flush=True)
