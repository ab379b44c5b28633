"""Score controllers in each other's dreams: does another world model agree with the one a controller was trained in?

    python examples/cross_dream.py --bundles runs/carracing/road-round3/bundle runs/carracing/g-round5/bundle \
        --controllers runs/carracing/road-round3/controller-g120 runs/carracing/g-round5/controller

Every controller drives 100 dreams (tau 1.0 unless --temperatures) of every bundle, on the same dream seeds. A
controller reads [z, h] from whichever M dreams it, so this only makes sense for bundles that share V and whose
M's descend from one another (the rounds of `dreamenv iterate`); the usual check that a controller belongs to its
bundle is skipped on purpose. If the dreams disagree about a controller that its own dream overrates, their
disagreement could pick controllers without the game.
"""
import argparse

import numpy as np

from dreamenv.agents.controller import LinearController, dream_returns
from dreamenv.registry import load_world_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", required=True)
    parser.add_argument("--controllers", nargs="+", required=True)
    parser.add_argument("--temperatures", default="1.0", help="comma-separated dream temperatures")
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    controllers = [LinearController.load(path) for path in args.controllers]
    print("| dream (bundle) | controller | " + " | ".join(f"tau {t}" for t in temperatures) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in temperatures) + " |")
    for bundle in args.bundles:
        world_model = load_world_model(bundle)
        for path, controller in zip(args.controllers, controllers):
            means = [dream_returns(world_model, lambda obs, rows: controller.act(obs), args.episodes, tau,
                                   np.random.default_rng(0))[0].mean() for tau in temperatures]
            print(f"| {bundle} | {path} | " + " | ".join(f"{m:.1f}" for m in means) + " |", flush=True)


if __name__ == "__main__":
    main()
