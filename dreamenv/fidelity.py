"""Fidelity of world models on real episodes: open-loop latent and pixel error by horizon, reward error, and done
precision/recall, for any bundles (MDN-RNN or RSSM) of one env, on episodes none of them trained on."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dreamenv.compare import new_figure
from dreamenv.data.dataset import open_rollouts, split_episode_ids
from dreamenv.envs.dream import check_temperature, dream_core
from dreamenv.envs.real import latent_filter
from dreamenv.metrics import DoneScores
from dreamenv.registry import load_world_model, resolve_bundle
from dreamenv.worldmodel import WorldModel

TABLE_HORIZONS = (1, 5, 10, 20, 30, 50)
STEP_BINS = 8  # the one-step done scores are also split over this many equal spans of the episode limit
PLOT_PANELS = (  # (result key, panel title); latent last, as its scale is each model's own
    ("pixel_mse", "pixel MSE (comparable)"),
    ("reward_mae_by_horizon", "reward MAE"),
    ("latent_mse", "latent MSE (own space each, not comparable)"),
)


@dataclass
class FidelityConfig:
    """How the comparison runs: windows start every `stride` steps and are dreamed `horizon` steps open-loop."""

    horizon: int = 50
    stride: int = 10
    temperature: float = 1.0  # sampling temperature of the open-loop dream
    max_episodes: int | None = None  # at most this many evaluation episodes (the first ones)
    all_episodes: bool = False  # also score episodes a bundle trained on
    batch_episodes: int = 8  # episodes filtered and dreamed together
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("horizon", "stride", "batch_episodes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_temperature(float(self.temperature))


@dataclass
class Episode:
    """One real episode: frames (T, 64, 64, 3) uint8, raw actions (T, ...), rewards and terminations (T,)."""

    key: tuple[str, int]  # (resolved store path, episode number in that store)
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray


def trained_episodes(world_model: WorldModel, name: str, data: Sequence[str | Path]) -> set[tuple[str, int]]:
    """The (store, episode) keys of `data` the bundle's dynamics model trained on, from its recorded stores and split;
    none when `data` holds none of those stores (then they need not be readable: a shipped bundle's are not)."""
    stores = world_model.info.get("data", {}).get("rollouts", [])
    recipe = world_model.info.get("recipe", {})
    if stores and not {Path(s).resolve() for s in stores} & {Path(d).resolve() for d in data}:
        return set()
    if not stores or "seed" not in recipe:
        raise ValueError(f"{name} does not record its training stores and split: pass --all-episodes to score every episode")
    keys = []
    for store in stores:
        try:
            with open_rollouts(store) as rollouts:
                keys.extend((str(Path(store).resolve()), i) for i in range(rollouts.num_episodes))
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{name} was trained on {store}, which cannot be read here ({err}); "
                             "pass --all-episodes to score every episode") from None
    train_ids, _ = split_episode_ids(len(keys), float(recipe.get("holdout_fraction", 0.1)), int(recipe["seed"]))
    return {keys[i] for i in train_ids}


def load_episodes(paths: Sequence[str | Path], exclude: set[tuple[str, int]], max_episodes: int | None) -> list[Episode]:
    """The episodes of the stores not in `exclude`, in store order, at most max_episodes of them."""
    episodes: list[Episode] = []
    for path in paths:
        with open_rollouts(path) as rollouts:
            arrays = rollouts.load_arrays()
            for number, (start, end) in enumerate(rollouts.episode_bounds()):
                key = (str(Path(path).resolve()), number)
                if key in exclude:
                    continue
                if max_episodes is not None and len(episodes) >= max_episodes:
                    return episodes
                episodes.append(Episode(key, rollouts.load_frames(np.arange(start, end)), arrays["actions"][start:end],
                                        arrays["rewards"][start:end].astype(np.float64),
                                        arrays["terminated"][start:end].astype(np.float64)))
    return episodes


class HorizonSums:
    """Per-horizon sums of the open-loop errors of one bundle, and its done scores."""

    def __init__(self, horizon: int, step_edges: np.ndarray) -> None:
        self.latent = np.zeros(horizon)
        self.pixel = np.zeros(horizon)
        self.frames = np.zeros(horizon)
        self.reward_abs = np.zeros(horizon)
        self.reward_sq = np.zeros(horizon)
        self.steps = np.zeros(horizon)
        self.one_step_reward_abs = 0.0
        self.one_step_steps = 0
        self.done_one_step = DoneScores()  # every real step, dreamed one step from the filtered state
        self.done_open_loop = DoneScores()  # every step of every window
        self.step_edges = step_edges  # spans of the episode's step count: is M's p(done) as right late as early?
        self.steps_by_span = np.zeros(len(step_edges) - 1)
        self.true_ends_by_span = np.zeros(len(step_edges) - 1)
        self.predicted_ends_by_span = np.zeros(len(step_edges) - 1)

    def result(self) -> dict[str, Any]:
        """Means per horizon (None where no window reached it) and the overall reward error and done scores."""
        def mean(total: np.ndarray, count: np.ndarray) -> list[float | None]:
            return [float(t / c) if c else None for t, c in zip(total, count)]

        steps = self.steps.sum()
        return {
            "latent_mse": mean(self.latent, self.frames),
            "pixel_mse": mean(self.pixel, self.frames),
            "reward_mae_by_horizon": mean(self.reward_abs, self.steps),
            "windows_by_horizon": self.steps.astype(int).tolist(),
            "reward_mae_one_step": float(self.one_step_reward_abs / self.one_step_steps) if self.one_step_steps else None,
            "reward_mae": float(self.reward_abs.sum() / steps) if steps else None,
            "reward_mse": float(self.reward_sq.sum() / steps) if steps else None,
            "done_one_step": self.done_one_step.metrics(),
            "done_open_loop": self.done_open_loop.metrics(),
            "done_by_episode_step": {"edges": self.step_edges.astype(int).tolist(), "steps": self.steps_by_span.astype(int).tolist(),
                                     "true_ends": self.true_ends_by_span.astype(int).tolist(),
                                     "predicted_ends": self.predicted_ends_by_span.tolist()},
        }

    def add_by_span(self, t: int, done_prob: np.ndarray, truth: np.ndarray, alive: np.ndarray) -> None:
        """Count one real step t of a group's episodes (one-step p(done) against the truth) in its span."""
        span = min(int(np.searchsorted(self.step_edges, t, side="right")) - 1, len(self.steps_by_span) - 1)
        self.steps_by_span[span] += alive.sum()
        self.true_ends_by_span[span] += truth[alive].sum()
        self.predicted_ends_by_span[span] += done_prob[alive].sum()


def _rows(state: tuple[torch.Tensor, ...], rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    return type(state)(*(t[torch.from_numpy(rows)] for t in state))


def _cat(states: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return type(states[0])(*(torch.cat(parts) for parts in zip(*states)))


def score_group(world_model: WorldModel, group: list[Episode], config: FidelityConfig, rng: np.random.Generator,
                sums: HorizonSums) -> None:
    """Filter a group of real episodes through the model, then dream every window open-loop and add up its errors."""
    lengths = np.array([len(e.actions) for e in group])
    core = dream_core(world_model)
    tracker = latent_filter(world_model, len(group))
    observations = np.zeros((len(group), int(lengths.max()), world_model.latent_obs_dim), np.float32)
    starts, states = [], []
    for t in range(int(lengths.max())):
        alive = t < lengths
        last = np.minimum(t, lengths - 1)  # ended episodes repeat their last frame and action, masked out
        observations[:, t] = tracker.observe(np.stack([e.frames[i] for e, i in zip(group, last)]))
        here = tracker.dream_state()
        actions = np.stack([e.actions[i] for e, i in zip(group, last)])
        if t % config.stride == 0:
            rows = np.flatnonzero(alive)
            starts.extend((int(r), t) for r in rows)
            states.append(_rows(here, rows))
        after, rewards, _ = core.step(here, world_model.encode_actions(actions), config.temperature,
                                      core.draw_noise(rng, len(group)), "threshold", 0.5)
        error = (rewards - np.array([e.rewards[i] for e, i in zip(group, last)]))[alive]
        sums.one_step_reward_abs += np.abs(error).sum()
        sums.one_step_steps += alive.sum()
        done_prob, truth = core.done_probability(after), np.array([e.terminated[i] for e, i in zip(group, last)])
        sums.done_one_step.add(torch.from_numpy(done_prob), torch.from_numpy(truth.astype(np.float32)),
                               torch.from_numpy(alive.astype(np.float32)))
        sums.add_by_span(t, done_prob, truth, alive)
        tracker.advance(actions)
    state = _cat(states)
    episode_of = np.array([r for r, _ in starts])
    start_of = np.array([t for _, t in starts])
    for k in range(1, config.horizon + 1):
        step_at = start_of + k - 1  # the real step this dream step imitates
        has_step = step_at < lengths[episode_of]
        if not has_step.any():
            break
        actions = np.stack([group[e].actions[min(s, lengths[e] - 1)] for e, s in zip(episode_of, step_at)])
        state, rewards, _ = core.step(state, world_model.encode_actions(actions), config.temperature,
                                      core.draw_noise(rng, len(starts)), "threshold", 0.5)
        truth_reward = np.array([group[e].rewards[min(s, lengths[e] - 1)] for e, s in zip(episode_of, step_at)])
        truth_done = np.array([group[e].terminated[min(s, lengths[e] - 1)] for e, s in zip(episode_of, step_at)])
        error = (rewards - truth_reward)[has_step]
        sums.reward_abs[k - 1] += np.abs(error).sum()
        sums.reward_sq[k - 1] += np.square(error).sum()
        sums.steps[k - 1] += has_step.sum()
        done_prob, mask = torch.from_numpy(core.done_probability(state)), torch.from_numpy(has_step.astype(np.float32))
        truth = torch.from_numpy(truth_done.astype(np.float32))
        sums.done_open_loop.add(done_prob, truth, mask)
        has_frame = (start_of + k) < lengths[episode_of]
        if has_frame.any():
            rows = np.flatnonzero(has_frame)
            at = start_of[rows] + k
            real_obs = observations[episode_of[rows], at]
            sums.latent[k - 1] += np.square(core.latent_obs(state)[rows] - real_obs).mean(1).sum()
            real_frames = np.stack([group[episode_of[r]].frames[a] for r, a in zip(rows, at)]).astype(np.float32) / 255.0
            dreamed = core.pixels(_rows(state, rows)).astype(np.float32) / 255.0
            sums.pixel[k - 1] += np.square(dreamed - real_frames).reshape(len(rows), -1).mean(1).sum()
            sums.frames[k - 1] += len(rows)


def fidelity(bundles: Sequence[str | Path], data: Sequence[str | Path], config: FidelityConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score bundles of one env on the stores' episodes that none of them trained on (unless config.all_episodes)."""
    config = config or FidelityConfig()
    models = [load_world_model(b) for b in bundles]
    names = [str(b) for b in bundles]
    with open_rollouts(data[0]) as first:
        env_id, frame_spec, space = first.env_id, first.frame_spec, first.action_space
    for name, wm in zip(names, models):
        if (wm.env_id, wm.frame_spec, wm.action_space) != (env_id, frame_spec, space):
            raise ValueError(f"{name} is a world model of {wm.env_id} ({wm.frame_spec}, {wm.action_space}); {data[0]} holds "
                             f"{env_id} rollouts ({frame_spec}, {space}): compare bundles on rollouts of their env")
    exclude = set() if config.all_episodes else set().union(*(trained_episodes(wm, n, data) for wm, n in zip(models, names)))
    episodes = load_episodes(data, exclude, config.max_episodes)
    if not episodes:
        raise ValueError("every episode of the data was used to train one of the bundles: collect fresh episodes "
                         "(dreamenv collect ... --seed N) or pass --all-episodes")
    result: dict[str, Any] = {
        "env_id": env_id, "data": [str(p) for p in data], "episodes": len(episodes),
        "steps": int(sum(len(e.actions) for e in episodes)), "config": asdict(config), "bundles": [],
    }
    groups = [episodes[i : i + config.batch_episodes] for i in range(0, len(episodes), config.batch_episodes)]
    for name, wm in zip(names, models):
        sums = HorizonSums(config.horizon, np.unique(np.linspace(0, wm.max_episode_steps, STEP_BINS + 1).round()))
        rng = np.random.default_rng(config.seed)
        for group in tqdm(groups, desc=f"fidelity {Path(name).name}", unit="group", disable=not progress):
            score_group(wm, group, config, rng, sums)
        result["bundles"].append({"bundle": str(resolve_bundle(name)), "name": name, "model_kind": wm.model_kind,
                                  "latent_dim": wm.latent_obs_dim, **sums.result()})
    return result


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def format_fidelity(result: dict[str, Any]) -> str:
    """Markdown: errors by horizon side by side, then reward error and done precision/recall per bundle."""
    bundles = result["bundles"]
    labels = [chr(ord("A") + i) for i in range(len(bundles))]
    config = result["config"]
    lines = [f"{result['env_id']}: {result['episodes']} episodes ({result['steps']} steps), windows every "
             f"{config['stride']} steps, open loop at tau {config['temperature']:g}"]
    lines += [f"{label} = {b['name']} ({b['model_kind']}, latent observation {b['latent_dim']})"
              for label, b in zip(labels, bundles)]
    header = ["horizon"] + [f"{what} {label}" for what in ("latent MSE", "pixel MSE", "reward MAE") for label in labels]
    lines += ["", _row(*header), _row(*["---"] * len(header))]
    for h in (h for h in TABLE_HORIZONS if h <= config["horizon"]):
        lines.append(_row(str(h), *(_num(b[key][h - 1]) for key in ("latent_mse", "pixel_mse", "reward_mae_by_horizon")
                                     for b in bundles)))
    lines += ["", _row("", *labels), _row(*["---"] * (len(labels) + 1))]
    lines.append(_row("reward MAE, one step", *(_num(b["reward_mae_one_step"]) for b in bundles)))
    lines.append(_row("reward MAE / MSE, open loop", *(f"{_num(b['reward_mae'])} / {_num(b['reward_mse'])}" for b in bundles)))
    for scope, name in (("done_one_step", "one step"), ("done_open_loop", "open loop")):
        for kind, suffix in (("threshold 0.5", ""), ("sampled", "_sampled")):
            lines.append(_row(f"done precision / recall, {name} ({kind})",
                              *(f"{_num(b[scope]['done_precision' + suffix], 3)} / {_num(b[scope]['done_recall' + suffix], 3)}"
                                for b in bundles)))
    for scope, name in (("done_one_step", "one step"), ("done_open_loop", "open loop")):
        lines.append(_row(f"predicted ends per true end, {name}",
                          *(_num(b[scope]["predicted_dones_per_true"], 3) for b in bundles)))
    lines.append(_row("terminal steps", *(str(int(b["done_one_step"]["terminal_steps"])) for b in bundles)))
    spans = bundles[0]["done_by_episode_step"]
    lines += ["", _row("episode steps", "real steps", "true ends", *(f"predicted ends {label}" for label in labels)),
              _row(*["---"] * (3 + len(labels)))]
    for i, (lo, hi) in enumerate(zip(spans["edges"][:-1], spans["edges"][1:])):
        lines.append(_row(f"{lo}..{hi - 1}", str(spans["steps"][i]), str(spans["true_ends"][i]),
                          *(_num(b["done_by_episode_step"]["predicted_ends"][i], 1) for b in bundles)))
    lines += ["", "Predicted ends are the sums of M's one-step p(done) over the real steps of each span of the episode: "
              "beside the true ends they show whether the dream's deaths come as often late in a game as early.",
              "Latent MSE compares each model's dreamed observation with what RealEnv shows at the same step, in that "
              "model's own latent space (not comparable across models); pixel MSE is per pixel value in [0, 1] against "
              "the real frame (comparable)."]
    return "\n".join(lines)


def _curve(values: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """Horizons 1..len(values) and the values, NaN where no window reached a horizon (matplotlib leaves a gap)."""
    return np.arange(1, len(values) + 1), np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_fidelity(result: dict[str, Any], path: str | Path) -> Path:
    """PNG of each bundle's open-loop error against horizon, one panel per measure, so the models' drift can be seen."""
    figure, path = new_figure(path, figsize=(4.2 * len(PLOT_PANELS), 4.0))
    config = result["config"]
    for axes, (key, title) in zip(figure.subplots(1, len(PLOT_PANELS)), PLOT_PANELS):
        for index, bundle in enumerate(result["bundles"]):
            label = f"{chr(ord('A') + index)} = {'/'.join(Path(bundle['name']).parts[-2:])} ({bundle['model_kind']})"
            axes.plot(*_curve(bundle[key]), marker="o", markersize=2, label=label)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("open-loop horizon (steps)")
        axes.legend(fontsize=7)
    scope = "episodes (all scored, --all-episodes)" if config["all_episodes"] else "held-out episodes"
    figure.suptitle(f"{result['env_id']}: {result['episodes']} {scope}, open loop at tau {config['temperature']:g}",
                    fontsize=10)
    figure.savefig(path, format="png", dpi=120)
    return path
