"""Score several bundles' M on the same held-out episodes: z NLL, reward error, done precision and recall.

Each bundle's `dreamenv info` scores its M on its own held-out split, so two bundles trained on different data are
scored on different episodes. This scores them all on one set: the episodes of `--data` that the split of
`dreamenv train` over all the stores holds out (give the recipe's `holdout_fraction` and `seed`), keeping only
those from the `--new-from`-th episode on (e.g. the stores that only the newest M saw, so that no M trained on them).

    python examples/heldout_m.py --data A.h5 B.h5 NEW.h5 --new-from 1200 --holdout-fraction 0.05 --bundles OLD NEW
"""
import argparse
import json

import numpy as np

from dreamenv import load_world_model
from dreamenv.data.dataset import split_episode_ids
from dreamenv.train import (TrainConfig, encode_action_array, encode_frames, episode_data, load_rollout_data,
                            mdnrnn_heldout_metrics, read_frames, vae_digest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", required=True, help="the rollout stores, in the order `dreamenv train` got them")
    p.add_argument("--bundles", nargs="+", required=True, help="bundles of the stores' env")
    p.add_argument("--new-from", type=int, default=0, help="score only held-out episodes with this index or later")
    p.add_argument("--holdout-fraction", type=float, default=TrainConfig().holdout_fraction)
    p.add_argument("--seed", type=int, default=TrainConfig().seed)
    args = p.parse_args()

    data = load_rollout_data(args.data, with_frames=False)
    _, held = split_episode_ids(len(data.bounds), args.holdout_fraction, args.seed)
    held = held[held >= args.new_from]
    if not len(held):
        raise SystemExit(f"no held-out episode from index {args.new_from} on: lower --new-from")
    index = np.concatenate([np.arange(*data.bounds[i]) for i in held])
    frames = read_frames(args.data, index)
    lengths = data.bounds[held, 1] - data.bounds[held, 0]
    bounds = np.stack([np.cumsum(lengths) - lengths, np.cumsum(lengths)], axis=1)  # the held-out episodes, back to back
    arrays = {name: values[index] for name, values in data.arrays.items()}
    print(f"{len(held)} held-out episodes, {len(index)} steps")
    latents: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # bundles fine-tuned through one V share its encoding
    for bundle in args.bundles:
        wm = load_world_model(bundle)
        if wm.model_kind != "mdnrnn":
            raise SystemExit(f"{bundle} is an {wm.model_kind} bundle; this scores MDN-RNNs (`dreamenv fidelity` compares both kinds)")
        v = vae_digest(wm.vae)
        if v not in latents:
            latents[v] = encode_frames(wm.vae, frames)
        mu, logvar = latents[v]
        episodes = episode_data(bounds, np.arange(len(held)), mu, logvar, arrays,
                                lambda actions: encode_action_array(data.action_space, actions))
        metrics = mdnrnn_heldout_metrics(wm.mdnrnn.eval(), episodes, TrainConfig().mdnrnn)
        print(bundle, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
