"""Does M's done head see a death coming along real episodes? p(done) filtered over real frames, against the real ends.

    python examples/done_along_real_episodes.py VizdoomTakeCover runs/doom2k/trange-round1/rollouts.h5

For every episode of the store, V and M follow the real frames and actions exactly as Real-<Env>-v0 does, and
the done head gives p(done) at each step. The table says, for each threshold, in how many episodes p(done)
crosses it, how many steps before the real end it first does, and how long episodes would last if each ended
at that first crossing (as a dream with done_mode="threshold" would). A head that looks good here while
dreams still overrate controllers points at M's imagined frames, not at the head.

    python examples/done_along_real_episodes.py VizdoomTakeCover runs/rv/heldout-random.h5 --health

With --health (VizDoom, a store written by `dreamenv collect`) each episode is replayed from its seed and actions to
read the player's health, and p(done) is reported at the hits that killed, at the hits that did not, and elsewhere:
whether M knows which hit is the fatal one.
"""
import argparse

import h5py
import numpy as np
import torch

import dreamenv
from dreamenv.data.dataset import open_rollouts
from dreamenv.data.sources import make_source_env
from dreamenv.envs.real import MDNFilter

THRESHOLDS = (0.05, 0.09, 0.15, 0.25, 0.5)


def done_probabilities(world_model: dreamenv.WorldModel, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """p(done) at each step of one real episode: the head reads h_{t+1} = M(z_t, a_t, h_t), z_t = V(frame t)."""
    tracker = MDNFilter(world_model)
    probabilities = np.empty(len(actions))
    with torch.no_grad():
        for t in range(len(actions)):
            tracker.observe(frames[t : t + 1])
            tracker.advance(actions[t : t + 1])
            probabilities[t] = torch.sigmoid(world_model.mdnrnn.done_head(tracker.h)).item()
    return probabilities


def health_along(env_id: str, seed: int, actions: np.ndarray) -> np.ndarray:
    """The player's health at the reset and after each step of the episode reset with `seed` and replayed with
    `actions` (VizDoom's first game variable; the game replays a seed and its actions exactly)."""
    env = make_source_env(env_id)
    health = [float(env.reset(seed=seed)[0]["gamevariables"][0])]
    health += [float(env.step(a)[0]["gamevariables"][0]) for a in actions]
    env.close()
    return np.array(health)


def report_hits(episodes: list[np.ndarray], healths: list[np.ndarray]) -> None:
    """p(done) at the fatal hits, at the other hits and at the steps without a hit; then by the hit's number in its
    episode: how often the k-th hit kills in the game, against M's p(done) there; and the same by the step it lands on."""
    fatal, other, calm, hits = [], [], [], []
    by_number: dict[int, list[tuple[bool, float, float]]] = {}  # k -> (killed, health before, p(done)) per k-th hit
    by_step: list[tuple[int, bool, float]] = []  # (step, killed, p(done)) per hit
    for p, health in zip(episodes, healths):
        hit = np.diff(health) < 0
        hit[-1] = True  # the last step is the death
        steps = np.flatnonzero(hit)
        hits.append(len(steps))
        fatal.append(p[-1])
        other.extend(p[steps[:-1]])
        calm.extend(p[~hit])
        for k, step in enumerate(steps, start=1):
            by_number.setdefault(k, []).append((k == len(steps), health[step], p[step]))
            by_step.append((step, k == len(steps), p[step]))
    print(f"hits per death: mean {np.mean(hits):.2f}, at most {max(hits)}; p(done) at the fatal hit: mean "
          f"{np.mean(fatal):.3f} (above 0.5: {np.mean(np.array(fatal) > 0.5):.0%}); at the other hits: mean "
          f"{np.mean(other):.3f} (above 0.5: {np.mean(np.array(other) > 0.5):.0%}); elsewhere: mean {np.mean(calm):.4f}")
    print("| hit | hits | killed, in the game | health before it | M's p(done) there |\n| --- | --- | --- | --- | --- |")
    for k, rows in sorted(by_number.items()):
        killed, before, p_done = np.array(rows).T
        print(f"| {k} | {len(rows)} | {killed.mean():.2f} | {before.mean():.1f} | {p_done.mean():.3f} |")
    step, killed, p_done = np.array(by_step).T
    print("| hit at step | hits | killed, in the game | M's p(done) there |\n| --- | --- | --- | --- |")
    for low, high in ((0, 300), (300, 600), (600, 1000), (1000, 2100)):
        rows = (step >= low) & (step < high)
        if rows.any():
            print(f"| {low}..{high - 1} | {rows.sum()} | {killed[rows].mean():.2f} | {p_done[rows].mean():.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", help="MDN-RNN bundle directory or shipped name")
    parser.add_argument("store", help="rollout store (HDF5) of episodes that end in a death")
    parser.add_argument("--health", action="store_true", help="replay each episode to read health (VizDoom)")
    args = parser.parse_args()
    wm = dreamenv.load_world_model(args.bundle)
    if wm.model_kind != "mdnrnn":
        parser.error(f"{args.bundle} is an {wm.model_kind} bundle; this example reads an MDN-RNN's done head")
    with open_rollouts(args.store) as store:
        bounds, arrays, frames = store.episode_bounds(), store.load_arrays(), store.load_frames()
    actions = arrays["actions"]
    episodes = [done_probabilities(wm, frames[s:e], actions[s:e]) for s, e in bounds]
    lengths = np.array([len(p) for p in episodes])
    at_end = np.array([p[-1] for p in episodes])
    elsewhere = np.concatenate([p[:-1] for p in episodes])
    print(f"{len(episodes)} episodes, mean length {lengths.mean():.1f}; p(done) at the last step: mean {at_end.mean():.3f}, "
          f"median {np.median(at_end):.3f}; at other steps: mean {elsewhere.mean():.4f}")
    print("| threshold | episodes crossed | steps before the end at the first crossing (median) | within 5 steps | "
          "within 20 steps | mean length if ended there |\n| --- | --- | --- | --- | --- | --- |")
    for threshold in THRESHOLDS:
        first = np.array([np.argmax(p > threshold) if (p > threshold).any() else -1 for p in episodes])
        crossed = first >= 0
        before = (lengths - 1 - first)[crossed]
        ended = np.where(crossed, first + 1, lengths)
        print(f"| {threshold} | {crossed.mean():.2f} | {np.median(before):.0f} | {np.mean(before <= 5):.2f} | "
              f"{np.mean(before <= 20):.2f} | {ended.mean():.1f} |")
    if args.health:
        with h5py.File(args.store, "r") as f:
            first_seed = int(f.attrs["seed"])
        dying = [i for i, (s, e) in enumerate(bounds) if arrays["terminated"][e - 1]]
        report_hits([episodes[i] for i in dying],
                    [health_along(wm.env_id, first_seed + i, actions[bounds[i][0]:bounds[i][1]]) for i in dying])
