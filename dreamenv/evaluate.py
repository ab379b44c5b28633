"""Virtual vs actual: one controller scored in the dream (batched) and in the real game (through the evaluator)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm.auto import tqdm

from dreamenv.agents.controller import LinearController, dream_returns, load_controller
from dreamenv.parallel import run_tasks
from dreamenv.registry import load_world_model, resolve_bundle, resolve_controller


def virtual_scores(bundle: Any, controller: LinearController, episodes: int, temperature: float, seed: int = 0) -> np.ndarray:
    """Returns of `episodes` dreams at `temperature`, all stepped in one batch, ended the way the controller was trained."""
    wm = load_world_model(bundle)
    cmaes = controller.info.get("cmaes", {})
    returns, _ = dream_returns(wm, lambda obs, rows: controller.act(obs), episodes, temperature, np.random.default_rng(seed),
                               done_mode=cmaes.get("done_mode", "sample"), done_threshold=cmaes.get("done_threshold", 0.5))
    return returns


def trained_temperature(controller: LinearController, default: float) -> float:
    """The dream temperature a controller was trained at (the middle of its range if randomised)."""
    tau = controller.info.get("temperature", default)
    return float(np.mean(tau))


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
    temperatures = list(temperatures) if temperatures else [trained_temperature(ctrl, wm.default_temperature)]
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


# The paper's TakeCover table (Ha & Schmidhuber 2018, table 2): each controller trained in the dream at tau.
PAPER_TAKECOVER = {0.10: ((2086, 140), (193, 58)), 0.50: ((2060, 277), (196, 50)), 1.00: ((1145, 690), (868, 511)),
                   1.15: ((918, 546), (1092, 556)), 1.30: ((732, 269), (753, 139))}


def temperature_table(
    bundle: Any, controllers: Mapping[float, str | Path], episodes: int = 100, seed: int = 0, backend: str = "process",
    workers: int = 2, real: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """The paper's experiment: each controller (trained in the dream at tau) scored in that dream and in the game."""
    wm = load_world_model(bundle)
    rows = []
    for tau, path in sorted(controllers.items()):
        ctrl = load_controller(path, wm)
        row = {"temperature": float(tau), "controller": str(resolve_controller(path)),
               "virtual": summary(virtual_scores(wm, ctrl, episodes, tau, seed))}
        if real:
            row["actual"] = summary(actual_scores(bundle, path, episodes, seed, backend, workers, progress))
        rows.append(row)
    return {"env_id": wm.env_id, "bundle": str(resolve_bundle(bundle)), "episodes": episodes, "seed": seed, "rows": rows}


def _mean_std(s: dict[str, float] | None) -> str:
    return f"{s['mean']:.1f} +- {s['std']:.1f}" if s else "n/a"


def format_temperature_table(result: dict[str, Any]) -> str:
    """Markdown: one row per training temperature, our virtual and actual beside the paper's (TakeCover)."""
    paper = PAPER_TAKECOVER if result["env_id"].startswith("VizdoomTakeCover") else {}
    lines = [f"{result['env_id']}: {result['episodes']} episodes each", "",
             "| tau | virtual | actual | paper virtual | paper actual |", "| --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        p = paper.get(round(row["temperature"], 2))
        paper_text = f"{p[0][0]} +- {p[0][1]} | {p[1][0]} +- {p[1][1]}" if p else "| "
        lines.append(f"| {row['temperature']:g} | {_mean_std(row['virtual'])} | {_mean_std(row.get('actual'))} | {paper_text} |")
    return "\n".join(lines)


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a temperature table; a single-controller evaluate() result becomes one row per dream temperature."""
    if "rows" in result:
        return result["rows"]
    return [{"temperature": float(tau), "virtual": v, "actual": result.get("actual")} for tau, v in result["virtual"].items()]


def plot_temperature_table(result: dict[str, Any], path: str | Path) -> Path:
    """PNG of virtual and actual score against tau, with the paper's points beside ours for TakeCover."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('plotting needs matplotlib: pip install "dreamenv[plot]"') from error
    rows = table_rows(result)
    taus = np.array([r["temperature"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, color in (("virtual", "tab:blue"), ("actual", "tab:orange")):
        have = [r for r in rows if r.get(key)]
        if have:
            ax.errorbar([r["temperature"] for r in have], [r[key]["mean"] for r in have], [r[key]["std"] for r in have],
                        marker="o", capsize=3, color=color, label=f"ours, {key}")
    if result["env_id"].startswith("VizdoomTakeCover"):
        paper_taus = np.array(sorted(PAPER_TAKECOVER))
        for index, (key, color) in enumerate((("virtual", "tab:blue"), ("actual", "tab:orange"))):
            means = [PAPER_TAKECOVER[t][index][0] for t in paper_taus]
            ax.plot(paper_taus, means, linestyle="--", marker="s", color=color, alpha=0.5, label=f"paper, {key}")
    ax.set_xlabel("dream temperature tau")
    ax.set_ylabel("score (mean +- std)")
    ax.set_title(f"{result['env_id']}: virtual vs actual, {result['episodes']} episodes")
    ax.set_xticks(sorted(set(taus.tolist())))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
