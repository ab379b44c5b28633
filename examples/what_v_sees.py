"""What does V keep of small things? Real frames beside V's reconstructions, and how many coloured blobs survive.

    python examples/what_v_sees.py runs/doom2k/bundle runs/doom2k/rollouts.h5 --out v.png

A dream can only show what V encodes. In TakeCover a fireball far away is a few bright pixels: if V blurs it
away, M cannot see it coming and the dream's fireballs appear only when they are close. This counts the blobs
of pixels at least --colour-min in every channel (default: TakeCover's yellow fireballs) in held-out frames,
by size, and how many of them still have such a pixel in V's reconstruction. --vae-weights scores V training
checkpoints (their model.safetensors) beside the bundle's V:

    python examples/what_v_sees.py runs/doom2k/bundle runs/doom2k/rollouts.h5 --vae-weights runs/doom2k/v3/bundle.work/vae/model.safetensors
"""
import argparse
import copy

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import dreamenv
from dreamenv.data.dataset import open_rollouts, split_episode_ids
from dreamenv.models.vae import frames_to_tensor, tensor_to_frames

SIZES = ((1, 3), (4, 15), (16, 64 * 64))


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, each as an (N, 2) array of pixel coordinates."""
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, pixels = [(y, x)], []
        while stack:
            a, b = stack.pop()
            pixels.append((a, b))
            for p, q in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= p < mask.shape[0] and 0 <= q < mask.shape[1] and mask[p, q] and not seen[p, q]:
                    seen[p, q] = True
                    stack.append((p, q))
        found.append(np.array(pixels))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", help="bundle directory or shipped name (a V + M bundle)")
    parser.add_argument("rollouts", help="rollout store of the bundle's env")
    parser.add_argument("--vae-weights", nargs="*", default=[], help="V checkpoints (model.safetensors) to score too")
    parser.add_argument("--colour-min", default="180,140,0", help="R,G,B minimum of a blob pixel")
    parser.add_argument("--holdout-fraction", type=float, default=0.05, help="the recipe's, so these frames are held out")
    parser.add_argument("--episodes", type=int, default=4, help="episode endings in the PNG")
    parser.add_argument("--out", help="PNG of episode endings: real frames over each V's reconstructions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    vaes = {"bundle": dreamenv.load_world_model(args.bundle).vae}
    for path in args.vae_weights:
        vaes[path] = copy.deepcopy(vaes["bundle"])
        vaes[path].load_state_dict(load_file(path))
    colour_min = np.array([int(v) for v in args.colour_min.split(",")])

    def reconstruct(vae: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tensor_to_frames(vae.decode(vae.encode(frames_to_tensor(frames))[0]))

    with open_rollouts(args.rollouts) as store:
        bounds = store.episode_bounds()
        _, heldout = split_episode_ids(len(bounds), args.holdout_fraction, 0)
        frames = store.load_frames(np.concatenate([np.arange(*bounds[i]) for i in heldout]))
        endings = [store.load_frames(np.linspace(max(s, e - 40), e - 1, 8).astype(int))
                   for s, e in bounds[heldout[: args.episodes]]]
    counts, kept, error = np.zeros(len(SIZES), int), np.zeros((len(vaes), len(SIZES)), int), np.zeros(len(vaes))
    for start in range(0, len(frames), 256):
        real = frames[start:start + 256]
        masks = [(real >= colour_min).all(-1)]
        for v, vae in enumerate(vaes.values()):
            rebuilt = reconstruct(vae, real)
            error[v] += ((real / 255.0 - rebuilt / 255.0) ** 2).sum()
            masks.append((rebuilt >= colour_min).all(-1))
        for i in range(len(real)):
            for blob in blobs(masks[0][i]):
                k = next(j for j, (lo, hi) in enumerate(SIZES) if lo <= len(blob) <= hi)
                counts[k] += 1
                for v in range(len(vaes)):
                    kept[v, k] += masks[v + 1][i][blob[:, 0], blob[:, 1]].any()
    print(f"{len(frames)} held-out frames; share of the blobs that V keeps, by size\n")
    print("| V | reconstruction error (summed squares per frame) | " + " | ".join(
        f"{lo}-{hi} px ({n} blobs)" if hi < 64 * 64 else f"{lo}+ px ({n} blobs)" for (lo, hi), n in zip(SIZES, counts)) + " |")
    print("| --- " * (len(SIZES) + 2) + "|")
    for v, name in enumerate(vaes):
        print(f"| {name} | {error[v] / len(frames):.2f} | " + " | ".join(f"{kept[v, k] / max(counts[k], 1):.3f}"
                                                                    for k in range(len(SIZES))) + " |")
    if args.out:
        rows = [np.concatenate(list(block), 1) for real in endings
                for block in (real, *(reconstruct(vae, real) for vae in vaes.values()))]
        Image.fromarray(np.concatenate(rows, 0)).save(args.out)


if __name__ == "__main__":
    main()
