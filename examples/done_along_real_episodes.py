"""Does M's done head see a death coming along real episodes? p(done) filtered over real frames, against the real ends.

    python examples/done_along_real_episodes.py VizdoomTakeCover runs/doom2k/trange-round1/rollouts.h5

For every episode of the store, V and M follow the real frames and actions exactly as Real-<Env>-v0 does, and
the done head gives p(done) at each step. The table says, for each threshold, in how many episodes p(done)
crosses it, how many steps before the real end it first does, and how long episodes would last if each ended
at that first crossing (as a dream with done_mode="threshold" would). A head that looks good here while
dreams still overrate controllers points at M's imagined frames, not at the head.
"""
import argparse

import numpy as np
import torch

import dreamenv
from dreamenv.data.dataset import open_rollouts
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", help="MDN-RNN bundle directory or shipped name")
    parser.add_argument("store", help="rollout store (HDF5) of episodes that end in a death")
    args = parser.parse_args()
    wm = dreamenv.load_world_model(args.bundle)
    if wm.model_kind != "mdnrnn":
        parser.error(f"{args.bundle} is an {wm.model_kind} bundle; this example reads an MDN-RNN's done head")
    with open_rollouts(args.store) as store:
        bounds, actions, frames = store.episode_bounds(), store.load_arrays()["actions"], store.load_frames()
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
