"""Score controllers and agents in each other's dreams: does another world model agree with the one they trained in?

    python examples/cross_dream.py --bundles CarRacing runs/car5/m --controllers CarRacing \
        --agents runs/car4/dyn-s1 runs/car4/rfx-s1 --actual runs/car4/ctl.json runs/car4/dyn-s1.json runs/car4/rfx-s1.json

Every policy drives 100 dreams (tau 1.0 unless --temperatures) of every bundle, on the same dream seeds. A policy
reads [z, h] from whichever M dreams it, so this only makes sense for bundles that share V and whose M's descend from
one another (the rounds of `dreamenv iterate`, M fine-tuned from a shipped one); the usual check that a policy belongs
to its bundle is skipped on purpose. If a dream ranks the policies as the game does, it could pick among them (a
training seed, a stopping point) without the game. With --actual (one `dreamenv compare --json` per policy, controllers
first, on the same real seeds) each dream's Spearman rank correlation with the game is printed.
"""
import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dreamenv.agents.controller import LinearController, dream_returns
from dreamenv.agents.saved import load_agent
from dreamenv.registry import load_world_model, resolve_controller


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two score lists (ties broken by order: scores here are means of 100 dreams)."""
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]


def controller_policy(path: str) -> Policy:
    """A controller directory or shipped name as dream_returns' policy(obs, rows)."""
    controller = LinearController.load(resolve_controller(path))
    return lambda obs, rows: controller.act(obs)


def agent_policy(path: str) -> Policy:
    """A `dreamenv train-agent` directory as dream_returns' policy(obs, rows), its deterministic action."""
    agent = load_agent(path)

    def act(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(agent.predict(obs, deterministic=True)[0])
    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", nargs="+", required=True)
    parser.add_argument("--controllers", nargs="*", default=[])
    parser.add_argument("--agents", nargs="*", default=[], help="dreamenv train-agent directories (latent observations)")
    parser.add_argument("--actual", nargs="*", default=[], help="a compare JSON per policy, controllers first")
    parser.add_argument("--temperatures", default="1.0", help="comma-separated dream temperatures")
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args()
    names = args.controllers + args.agents
    if args.actual and len(args.actual) != len(names):
        parser.error(f"--actual needs one compare JSON per policy ({len(names)}), got {len(args.actual)}")
    temperatures = [float(t) for t in args.temperatures.split(",")]
    policies = [controller_policy(path) for path in args.controllers] + [agent_policy(path) for path in args.agents]
    actual = [json.loads(Path(path).read_text())["actual"]["mean"] for path in args.actual]
    head = " | ".join(f"tau {t}" for t in temperatures)
    print("| dream (bundle) | policy | " + head + (" | actual |" if actual else " |"))
    print("| --- | --- | " + " | ".join("---" for _ in temperatures) + (" | --- |" if actual else " |"))
    for bundle in args.bundles:
        world_model = load_world_model(bundle)
        means = np.array([[dream_returns(world_model, policy, args.episodes, tau, np.random.default_rng(0))[0].mean()
                           for tau in temperatures] for policy in policies])
        for i, name in enumerate(names):
            row = " | ".join(f"{m:.1f}" for m in means[i])
            print(f"| {bundle} | {name} | {row}" + (f" | {actual[i]:.1f} |" if actual else " |"), flush=True)
        if actual:
            rhos = " | ".join(f"{spearman(means[:, j], np.array(actual)):.2f}" for j in range(len(temperatures)))
            print(f"| {bundle} | Spearman rank correlation with the game | {rhos} | |", flush=True)


if __name__ == "__main__":
    main()
