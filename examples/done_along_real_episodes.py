"""Does M's done head see a death coming along real episodes? p(done) filtered over real frames, against the real ends.

    python examples/done_along_real_episodes.py VizdoomTakeCover runs/doom2k/trange-round1/rollouts.h5

For every episode of the store, V and M follow the real frames and actions exactly as Real-<Env>-v0 does, and
the done head gives p(done) at each step. The table says, for each threshold, in how many episodes p(done)
crosses it, how many steps before the real end it first does, and how long episodes would last if each ended
at that first crossing (as a dream with done_mode="threshold" would). A head that looks good here while
dreams still overrate controllers points at M's imagined frames, not at the head.

    python examples/done_along_real_episodes.py VizdoomTakeCover runs/rv/heldout-random.h5 --health

With --health (VizDoom, a store written by `dreamenv collect`) the player's health is read from the store's game
variables (or, in a store written before they were recorded, by replaying each episode from its seed and actions),
and p(done) is reported at the hits that killed, at the hits that did not, and elsewhere: whether M knows which hit
is the fatal one; then by the hit's number, by the step it lands on, and by whether the frame before it shows a
fireball (TakeCover's fireballs are its only bright yellow pixels).
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
FIREBALL_IN_VIEW = 20  # bright yellow pixels (of 64 x 64) from which a frame counts as showing a fireball
MOVING_BUCKETS = ((0.0, 0.35), (0.35, 0.75), (0.75, 1.01))  # shares of the last 10 actions that moved


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


def fireball_pixels(frames: np.ndarray) -> np.ndarray:
    """Bright yellow pixels (red > 200, green > 160) per 64 x 64 frame: TakeCover's fireballs, the rest is grey and brown."""
    return ((frames[..., 0] > 200) & (frames[..., 1] > 160)).sum(axis=(1, 2))


def moved(actions: np.ndarray) -> np.ndarray:
    """Share of the last 10 actions (this one included) that moved: TakeCover's action 0 is "none"."""
    return np.convolve(actions != 0, np.ones(10), "full")[: len(actions)] / 10


def last_step(length: int) -> np.ndarray:
    """(length,) flags with only the last step set: where an episode's death falls."""
    flags = np.zeros(length)
    flags[-1] = 1.0
    return flags


def report_hits(episodes: list[np.ndarray], healths: list[np.ndarray], frames: list[np.ndarray],
                actions: list[np.ndarray]) -> None:
    """p(done) at the fatal hits, at the other hits and at the steps without a hit; then by the hit's number in its
    episode: how often the k-th hit kills in the game, against M's p(done) there; the same by the step it lands on,
    by whether the frame before the hit shows a fireball, and, over all steps, by how much the player moved."""
    fatal, other, calm, hits = [], [], [], []
    by_number: dict[int, list[tuple[bool, float, float]]] = {}  # k -> (killed, health before, p(done)) per k-th hit
    by_step: list[tuple[int, bool, float, bool, int]] = []  # (step, killed, p(done), fireball in view, steps since one was)
    by_moving: list[np.ndarray] = []  # (share of the last 10 actions that moved, hit, death, unseen hit, p(done)) per step
    for p, health, episode_frames, episode_actions in zip(episodes, healths, frames, actions):
        hit = np.diff(health) < 0
        hit[-1] = True  # the last step is the death
        steps = np.flatnonzero(hit)
        hits.append(len(steps))
        fatal.append(p[-1])
        other.extend(p[steps[:-1]])
        calm.extend(p[~hit])
        in_view = fireball_pixels(episode_frames) >= FIREBALL_IN_VIEW
        for k, step in enumerate(steps, start=1):
            seen_at = np.flatnonzero(in_view[: step + 1])
            by_number.setdefault(k, []).append((k == len(steps), health[step], p[step]))
            by_step.append((step, k == len(steps), p[step], in_view[step], step - seen_at[-1] if len(seen_at) else step))
        by_moving.append(np.stack([moved(episode_actions), hit, last_step(len(p)), hit & ~in_view, p], axis=1))
    print(f"hits per death: mean {np.mean(hits):.2f}, at most {max(hits)}; p(done) at the fatal hit: mean "
          f"{np.mean(fatal):.3f} (above 0.5: {np.mean(np.array(fatal) > 0.5):.0%}); at the other hits: mean "
          f"{np.mean(other):.3f} (above 0.5: {np.mean(np.array(other) > 0.5):.0%}); elsewhere: mean {np.mean(calm):.4f}")
    print("| hit | hits | killed, in the game | health before it | M's p(done) there |\n| --- | --- | --- | --- | --- |")
    for k, rows in sorted(by_number.items()):
        killed, before, p_done = np.array(rows).T
        print(f"| {k} | {len(rows)} | {killed.mean():.2f} | {before.mean():.1f} | {p_done.mean():.3f} |")
    step, killed, p_done, seen, since = np.array(by_step).T
    print("| hit at step | hits | killed, in the game | M's p(done) there |\n| --- | --- | --- | --- |")
    for low, high in ((0, 300), (300, 600), (600, 1000), (1000, 2100)):
        rows = (step >= low) & (step < high)
        if rows.any():
            print(f"| {low}..{high - 1} | {rows.sum()} | {killed[rows].mean():.2f} | {p_done[rows].mean():.3f} |")
    print("| the frame before the hit | hits | killed, in the game | M's p(done) there | steps since a frame showed a "
          "fireball (median) |\n| --- | --- | --- | --- | --- |")
    for label, rows in ((f"shows no fireball (< {FIREBALL_IN_VIEW} bright pixels)", seen == 0), ("shows one", seen == 1)):
        if rows.any():
            print(f"| {label} | {rows.sum()} | {killed[rows].mean():.2f} | {p_done[rows].mean():.3f} | "
                  f"{np.median(since[rows]):.0f} |")
    moving, hit, death, unseen, p_done = np.concatenate(by_moving).T
    print("| share of the last 10 actions that moved | steps | hits per 1000 steps, in the game (of them unseen) | deaths "
          "per 1000 steps | M's p(done) summed per 1000 steps |\n| --- | --- | --- | --- | --- |")
    for low, high in MOVING_BUCKETS:
        rows = (moving >= low) & (moving < high)
        if rows.any():
            print(f"| {low:.2f}..{min(high, 1.0):.2f} | {rows.sum()} | {1000 * hit[rows].mean():.2f} "
                  f"({1000 * unseen[rows].mean():.2f}) | {1000 * death[rows].mean():.2f} | {1000 * p_done[rows].mean():.2f} |")


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
        if "game_variables" in arrays:  # health seen before each step; the death's own value is not needed
            healths = [np.append(arrays["game_variables"][s:e, 0], 0.0) for s, e in bounds[dying]]
        else:
            healths = [health_along(wm.env_id, first_seed + i, actions[bounds[i][0]:bounds[i][1]]) for i in dying]
        report_hits([episodes[i] for i in dying], healths, [frames[s:e] for s, e in bounds[dying]],
                    [actions[s:e] for s, e in bounds[dying]])
