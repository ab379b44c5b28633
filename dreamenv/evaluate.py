"""Virtual vs actual: one controller scored in the dream (batched) and in the real game (through the evaluator)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from dreamenv.agents.controller import LinearController, dream_returns, load_controller
from dreamenv.parallel import run_tasks
from dreamenv.registry import load_world_model, resolve_bundle, resolve_controller


def virtual_scores(bundle: Any, controller: LinearController, episodes: int, temperature: float, seed: int = 0) -> np.ndarray:
    """Returns of `episodes` dreams at `temperature`, all stepped in one batch."""
    wm = load_world_model(bundle)
    returns, _ = dream_returns(wm, lambda obs, rows: controller.act(obs), episodes, temperature, np.random.default_rng(seed))
    return returns


def real_episodes(task: tuple[str, str, list[int]]) -> list[tuple[int, float, int]]:
    """Worker: run a controller in RealEnv for each seed; returns (seed, return, length) per episode."""
    from dreamenv.envs.real import RealEnv

    bundle, controller_path, seeds = task
    controller = LinearController.load(controller_path)
    env = RealEnv(bundle)
    results = []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            total, length, done = 0.0, 0, False
            while not done and length < env.world_model.max_episode_steps:
                obs, reward, terminated, truncated, _ = env.step(controller.act(obs))
                total += reward
                length += 1
                done = terminated or truncated
            results.append((seed, total, length))
    finally:
        env.close()
    return results


def actual_scores(
    bundle: Any, controller: str | Path, episodes: int, seed: int = 0, backend: str = "process",
    workers: int = 2, progress: bool = True,
) -> np.ndarray:
    """Returns of `episodes` real episodes (seeds seed..seed+episodes-1), spread over the evaluator's workers."""
    seeds = list(range(seed, seed + episodes))
    chunk = max(1, min(8, -(-episodes // (2 * workers))))
    tasks = [(str(resolve_bundle(bundle)), str(resolve_controller(controller)), seeds[i : i + chunk]) for i in range(0, episodes, chunk)]
    by_seed: dict[int, float] = {}
    with tqdm(total=episodes, desc="real episodes", unit="ep", disable=not progress) as bar:
        for results in run_tasks(real_episodes, tasks, backend=backend, workers=workers):
            for s, total, _ in results:
                by_seed[s] = total
            bar.update(len(results))
    return np.array([by_seed[s] for s in seeds])


def summary(scores: np.ndarray) -> dict[str, float]:
    """Mean, std, min, max and count of a score array."""
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "min": float(np.min(scores)),
            "max": float(np.max(scores)), "episodes": int(len(scores))}


def evaluate(
    bundle: Any, controller: str | Path, episodes: int = 100, temperatures: Iterable[float] | None = None,
    seed: int = 0, backend: str = "process", workers: int = 2, real: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Score a controller in the dream at each temperature and in the real game; a JSON-able dict."""
    wm = load_world_model(bundle)
    ctrl = load_controller(controller, wm)
    temperatures = list(temperatures) if temperatures else [float(ctrl.info.get("temperature", wm.default_temperature))]
    result: dict[str, Any] = {
        "env_id": wm.env_id, "bundle": str(resolve_bundle(bundle)), "controller": str(resolve_controller(controller)),
        "episodes": episodes, "seed": seed, "virtual": {},
    }
    for tau in temperatures:
        result["virtual"][f"{tau:g}"] = summary(virtual_scores(wm, ctrl, episodes, tau, seed))
    if real:
        result["actual"] = summary(actual_scores(bundle, controller, episodes, seed, backend, workers, progress))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per temperature, virtual and actual mean +- std."""
    actual = result.get("actual")
    actual_text = f"{actual['mean']:.1f} +- {actual['std']:.1f}" if actual else "n/a"
    lines = [f"{result['env_id']}: {result['episodes']} episodes each", "",
             "| tau | virtual score | actual score |", "| --- | --- | --- |"]
    for tau, v in result["virtual"].items():
        lines.append(f"| {tau} | {v['mean']:.1f} +- {v['std']:.1f} | {actual_text} |")
    return "\n".join(lines)
