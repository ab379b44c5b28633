"""`dreamenv evaluate`: trained controllers scored by the compare harness, in the dream they were trained in
(temperature, done rule) and in the real game; the paper's temperature table and its plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from dreamenv.agents.controller import LinearController, load_controller
from dreamenv.compare import compare
from dreamenv.compare import markdown_table as format_table  # noqa: F401  (the table of evaluate() results)
from dreamenv.registry import load_world_model, resolve_bundle, resolve_controller


def trained_temperature(info: dict[str, Any], default: float) -> float:
    """The dream temperature a controller or agent was trained at, from its info (the middle of its range if randomised)."""
    tau = info.get("temperature", default)
    return float(np.mean(tau))


def trained_done_rule(controller: LinearController) -> dict[str, Any]:
    """compare() keyword arguments that end dreams the way the controller's CMA-ES run did (sampled deaths for one
    trained on their expectation)."""
    cmaes = controller.info.get("cmaes", {})
    done_mode = cmaes.get("done_mode", "sample")
    return {"done_mode": "sample" if done_mode == "expected" else done_mode, "done_threshold": cmaes.get("done_threshold", 0.5)}


def evaluate(
    bundle: Any, controller: str | Path, episodes: int = 100, temperatures: Iterable[float] | None = None,
    seed: int = 0, backend: str = "process", workers: int = 2, real: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Score a controller in the dream at each temperature (default: its training one) and in the real game."""
    wm = load_world_model(bundle)
    ctrl = load_controller(controller, wm)
    temperatures = list(temperatures) if temperatures else [trained_temperature(ctrl.info, wm.default_temperature)]
    result = compare(controller, bundle, temperatures, episodes, seed, backend, workers, algo="linear", real=real,
                     progress=progress, **trained_done_rule(ctrl))
    result["controller"] = str(resolve_controller(controller))
    return result


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
        scored = compare(path, bundle, [tau], episodes, seed, backend, workers, algo="linear", real=real, progress=progress,
                         **trained_done_rule(load_controller(path, wm)))
        row = {"temperature": float(tau), "controller": str(resolve_controller(path)), "virtual": scored["virtual"][f"{tau:g}"]}
        if real:
            row["actual"] = scored["actual"]
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
    from dreamenv.compare import new_figure

    fig, path = new_figure(path, figsize=(6, 4), dpi=120)
    rows = table_rows(result)
    taus = np.array([r["temperature"] for r in rows])
    ax = fig.add_subplot()
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
    fig.savefig(path)
    return path
