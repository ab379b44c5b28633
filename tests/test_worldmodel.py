"""The bundle (save/load, manifest, integrity and version checks) and resumable world-model training."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from typing import Any
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dreamenv.train
from dreamenv.data.dataset import open_rollouts
from dreamenv.models.vae import ConvVAE
from dreamenv.registry import load_world_model
from dreamenv.train import train_world_model
from dreamenv.worldmodel import BundleError, WorldModel, read_manifest
from tests.conftest import Tiny, tiny_train_config


def _outputs(wm: WorldModel) -> list[torch.Tensor]:
    """Everything a world model computes, on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(3, 64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        z = wm.encode_frames(frames)
        decoded = wm.vae.decode(z)
        space = copy.deepcopy(wm.action_space)
        space.seed(0)
        actions = wm.encode_actions(np.stack([space.sample() for _ in range(3)]))
        out, (h, c) = wm.mdnrnn(z[:, None], actions[:, None])
    return [z, decoded, *out, h, c, wm.initial_z]


def test_save_load_round_trip(tiny: Tiny, tmp_path: Path) -> None:
    wm = WorldModel.load(tiny.bundle)
    again = WorldModel.load(wm.save(tmp_path / "again"))
    for a, b in zip(_outputs(wm), _outputs(again)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert again.env_id == wm.env_id == tiny.env_id
    assert again.action_space == wm.action_space == gym.make(tiny.env_id).action_space
    assert again.frame_spec == wm.frame_spec and again.max_episode_steps == wm.max_episode_steps
    assert again.fingerprint == wm.fingerprint and len(wm.fingerprint) == 64
    assert (again.z_dim, again.hidden_size, again.latent_obs_dim) == (4, 16, 20)


def test_manifest_contents(tiny: Tiny) -> None:
    manifest = json.loads((tiny.bundle / "manifest.json").read_text())
    assert manifest["format"] == "dreamenv-bundle" and manifest["format_version"] >= 1
    assert {"dreamenv", "torch", "gymnasium"} <= manifest["versions"].keys()
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["versions"]["gymnasium"] == gym.__version__
    assert manifest["env_id"] == tiny.env_id
    real = gym.make(tiny.env_id)
    assert manifest["max_episode_steps"] == (real.spec.max_episode_steps or 1000)
    from dreamenv.spaces import space_from_json

    assert space_from_json(manifest["action_space"]) == real.action_space
    dims = manifest["dims"]
    assert (dims["z_dim"], dims["hidden_size"]) == (4, 16)
    assert dims["action_dim"] == (3 if tiny.kind == "discrete" else 2)
    assert manifest["frame_spec"]["size"] == 64
    # Every file but the manifest is listed with its sha256.
    files = {p.name for p in tiny.bundle.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((tiny.bundle / name).read_bytes()).hexdigest() == digest, name


def test_bundle_never_pickles(tiny: Tiny) -> None:
    names = {p.name for p in tiny.bundle.rglob("*")}
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".ckpt"))]
    assert all(n == "manifest.json" or n.endswith(".safetensors") for n in names), names


def test_tampered_weight_file_is_named(bundle_copy: Path) -> None:
    weights = bundle_copy / "mdnrnn.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"mdnrnn\.safetensors.*sha256"):
        WorldModel.load(bundle_copy)


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "vae.safetensors").unlink()
    with pytest.raises(BundleError, match=r"vae\.safetensors is missing"):
        WorldModel.load(bundle_copy)


def test_other_env_id_names_both(tiny_discrete: Tiny) -> None:
    with pytest.raises(BundleError) as err:
        WorldModel.load(tiny_discrete.bundle, env_id="CarRacing-v3")
    assert tiny_discrete.env_id in str(err.value) and "CarRacing-v3" in str(err.value)
    assert WorldModel.load(tiny_discrete.bundle, env_id=tiny_discrete.env_id).env_id == tiny_discrete.env_id


def test_newer_format_says_upgrade(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] += 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"newer.*pip install -U dreamenv"):
        WorldModel.load(bundle_copy)


@pytest.mark.parametrize("content", [None, "{not json", '{"format": "something-else"}'])
def test_not_a_bundle(tmp_path: Path, content: str | None) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(BundleError, match="bundle"):
        WorldModel.load(tmp_path)
    with pytest.raises(BundleError):
        load_world_model(tmp_path)


def test_unknown_path_or_name() -> None:
    with pytest.raises(BundleError, match="neither a bundle directory nor a shipped bundle name"):
        load_world_model("no/such/bundle-dir")


# --- training ----------------------------------------------------------------------------------------------

def test_heldout_metrics_in_bundle(tiny: Tiny) -> None:
    info = read_manifest(tiny.bundle)["info"]
    m, v = info["heldout"]["mdnrnn"], info["heldout"]["vae"]
    assert {"done_precision", "done_recall", "done_precision_sampled", "done_recall_sampled"} <= m.keys()
    assert np.isfinite(m["reward_mse"]) and np.isfinite(m["reward_mae"]) and np.isfinite(m["z_nll"])
    assert m["reward_mae"] ** 2 <= m["reward_mse"] + 1e-9  # Jensen
    assert m["episodes"] >= 1 and m["steps"] > 0 and v["frames"] > 0
    for key in ("done_recall", "done_precision", "done_recall_sampled", "done_precision_sampled"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key
    assert info["data"]["episodes"] == 12
    assert info["data"]["train_episodes"] + info["data"]["heldout_episodes"] == 12


def test_training_resumes_instead_of_restarting(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = Path(shutil.copytree(tiny.work, tmp_path / "work"))
    config = tiny_train_config()
    vae_state = json.loads((work / "vae" / "state.json").read_text())["progress"]
    m_state = json.loads((work / "mdnrnn" / "state.json").read_text())["progress"]
    assert vae_state == {"epoch": config.vae.epochs, "batch": 0}
    assert m_state == {"epoch": config.mdnrnn.epochs}
    latents = {p.name: p.stat().st_mtime_ns for p in (work / "latents").iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(ConvVAE, "forward", no_training)  # only V's training calls forward()
    monkeypatch.setattr(dreamenv.train, "encode_frames", no_training)  # the latents are stored
    monkeypatch.setattr(dreamenv.train, "_mdnrnn_losses", no_training)  # only M's training loss
    wm = train_world_model(tiny.rollouts, tmp_path / "bundle", config, work_dir=work, progress=False)

    assert {p.name: p.stat().st_mtime_ns for p in (work / "latents").iterdir()} == latents
    again, first = read_manifest(tmp_path / "bundle"), read_manifest(tiny.bundle)
    assert again["files"] == first["files"]  # the same weights as the first run wrote
    assert WorldModel.load(tmp_path / "bundle").fingerprint == wm.fingerprint


def test_training_resumes_mid_run(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """A run stopped after V (M's checkpoint gone) trains only M and gives a loadable bundle."""
    work = Path(shutil.copytree(tiny_discrete.work, tmp_path / "work"))
    shutil.rmtree(work / "mdnrnn")
    vae_files = {p.name: p.stat().st_mtime_ns for p in (work / "vae").iterdir()}
    train_world_model(tiny_discrete.rollouts, tmp_path / "bundle", tiny_train_config(), work_dir=work, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (work / "vae").iterdir()} == vae_files
    assert json.loads((work / "mdnrnn" / "state.json").read_text())["progress"] == {"epoch": 2}
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest["files"]["vae.safetensors"] == read_manifest(tiny_discrete.bundle)["files"]["vae.safetensors"]
    WorldModel.load(tmp_path / "bundle")


def test_latents_cache_encodes_only_new_stores(tiny_discrete: Tiny, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One more store (an iterate round) encodes only that store; another V encodes afresh."""
    from dreamenv.train import cached_latents

    tiny = tiny_discrete
    second = tmp_path / "more" / "rollouts.h5"  # the index finds its shards by relative path: copy both
    second.parent.mkdir()
    shutil.copy(tiny.rollouts, second)
    shutil.copytree(tiny.rollouts.with_suffix(".shards"), second.with_suffix(".shards"))
    vae, cache = load_world_model(tiny.bundle).vae, tmp_path / "cache"
    encoded: list[str] = []
    real_encode = dreamenv.train.encode_store

    def counted_encode(v: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
        encoded.append(str(path))
        return real_encode(v, path)

    monkeypatch.setattr(dreamenv.train, "encode_store", counted_encode)

    first = cached_latents(vae, [tiny.rollouts], cache)
    both = cached_latents(vae, [tiny.rollouts, second], cache)
    assert encoded == [str(tiny.rollouts), str(second)]  # the first store came from the cache
    assert np.array_equal(both[0][: len(first[0])], first[0]) and len(both[0]) == 2 * len(first[0])
    assert not list(cache.glob("*.partial"))
    with torch.no_grad():
        next(vae.parameters()).add_(0.5)
    cached_latents(vae, [tiny.rollouts], cache)
    assert encoded[-1] == str(tiny.rollouts) and len(list(cache.iterdir())) == 3  # another V: encoded again


def test_heldout_episode_returns_are_whole_episodes() -> None:
    """Predicted returns sum the reward head over each whole episode, even past M's training seq_len; the predicted
    ends per true end sum p(done) over every held-out step."""
    from dreamenv.data.dataset import EpisodeData
    from dreamenv.models.mdnrnn import MDNRNN, MDNRNNConfig
    from dreamenv.train import mdnrnn_heldout_metrics

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = MDNRNN(z_dim=3, action_dim=2, hidden_size=8, num_gaussians=2).eval()
    episodes = []
    for length, ends in ((7, True), (12, False), (5, True), (9, False)):
        mu = rng.normal(size=(length + 1, 3)).astype(np.float32)
        terminated = np.zeros(length, np.float32)
        terminated[-1] = ends
        episodes.append(EpisodeData(mu=mu, logvar=np.zeros_like(mu), actions=rng.normal(size=(length, 2)).astype(np.float32),
                                    rewards=rng.normal(size=length).astype(np.float32), terminated=terminated))
    real, predicted, done_sum = [], [], 0.0
    with torch.no_grad():
        for e in episodes:
            out, _ = model(torch.from_numpy(e.mu[None, :-1]), torch.from_numpy(e.actions[None]))
            real.append(float(e.rewards.sum()))
            predicted.append(float(out.reward.sum()))
            done_sum += float(torch.sigmoid(out.done_logit).sum())
    m = mdnrnn_heldout_metrics(model, episodes, MDNRNNConfig(hidden_size=8, num_gaussians=2, seq_len=4))
    assert m["return_mae"] == pytest.approx(np.mean(np.abs(np.subtract(predicted, real))), rel=1e-5)
    assert m["return_correlation"] == pytest.approx(np.corrcoef(real, predicted)[0, 1], rel=1e-5)
    assert m["terminal_steps"] == 2 and m["predicted_dones_per_true"] == pytest.approx(done_sum / 2, rel=1e-5)


def test_stores_read_from_disk_match_the_loaded_frames(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """M through a trained V never loads every frame: encode_store (in chunks), the per-store latents cache and
    read_frames give exactly what the in-memory path gives, across store boundaries."""
    from dreamenv.train import cached_latents, encode_frames, encode_store, load_rollout_data, read_frames

    tiny = tiny_discrete
    second = tmp_path / "rollouts.h5"  # the index finds its shards by relative path: copy both
    shutil.copy(tiny.rollouts, second)
    shutil.copytree(tiny.rollouts.with_suffix(".shards"), second.with_suffix(".shards"))
    paths = [tiny.rollouts, second]
    loaded, lean = load_rollout_data(paths), load_rollout_data(paths, with_frames=False)
    whole = []
    for path in paths:
        with open_rollouts(path) as r:
            whole.append(r.load_frames())
    assert np.array_equal(loaded.frames, np.concatenate(whole))  # every store's frames, in order
    assert lean.frames is None and np.array_equal(lean.bounds, loaded.bounds)
    assert all(np.array_equal(lean.arrays[k], loaded.arrays[k]) for k in loaded.arrays)
    vae = load_world_model(tiny.bundle).vae
    expected = encode_frames(vae, loaded.frames)
    chunked = [encode_store(vae, path, chunk_steps=7) for path in paths]
    for got in (tuple(np.concatenate(parts) for parts in zip(*chunked)), cached_latents(vae, paths, tmp_path / "disk"),
                cached_latents(vae, paths, tmp_path / "memory", loaded.frames)):
        for want, have in zip(expected, got):
            assert have.shape == want.shape and np.allclose(have, want, atol=1e-6)
    index = np.array([0, 5, len(loaded.frames) // 2, len(loaded.frames) // 2 + 1, len(loaded.frames) - 1])
    assert np.array_equal(read_frames(paths, index), loaded.frames[index])
    assert np.array_equal(read_frames(paths, index, chunk_steps=2), loaded.frames[index])
    assert read_frames(paths, index[:0]).shape == (0, *loaded.frames.shape[1:])
    with pytest.raises(ValueError, match="ascending"):
        read_frames(paths, index[::-1])
    with pytest.raises(IndexError, match="past the"):
        read_frames(paths, np.array([len(loaded.frames)]))


def test_vae_trains_on_from_another_bundles_v(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """vae_init_from starts V at that bundle's weights: no epochs keep them exactly, one epoch moves on from them
    (a fresh V with the same seed and recipe would be the bundle's V itself); the recipe records it."""
    tiny = tiny_discrete
    base = load_world_model(tiny.bundle).vae.state_dict()
    none, one = tiny_train_config(), tiny_train_config()
    none.vae.epochs = 0
    kept = train_world_model(tiny.rollouts, tmp_path / "kept", none, progress=False, vae_init_from=tiny.bundle)
    assert all(torch.equal(kept.vae.state_dict()[k], v) for k, v in base.items())
    moved = train_world_model(tiny.rollouts, tmp_path / "moved", one, progress=False, vae_init_from=tiny.bundle)
    assert any(not torch.equal(moved.vae.state_dict()[k], v) for k, v in base.items())
    assert moved.info["recipe"]["vae_init_from"] == str(tiny.bundle) and "vae_from" not in moved.info["recipe"]
    with pytest.raises(ValueError, match="pass one of them"):
        train_world_model(tiny.rollouts, tmp_path / "both", one, progress=False, vae_from=tiny.bundle,
                          vae_init_from=tiny.bundle)
    wider = tiny_train_config()
    wider.vae.z_dim = 8
    with pytest.raises(ValueError, match="--z-dim 4"):
        train_world_model(tiny.rollouts, tmp_path / "wider", wider, progress=False, vae_init_from=tiny.bundle)


def _m_that_always_predicts(value: float) -> "dreamenv.models.mdnrnn.MDNRNN":
    """An M whose mixture puts all its mass at z = value in every dim, whatever it reads."""
    from dreamenv.models.mdnrnn import MDNRNN

    model = MDNRNN(z_dim=4, action_dim=3, hidden_size=8, num_gaussians=2)
    with torch.no_grad():
        model.mdn.weight.zero_()
        bias = model.mdn.bias.view(4, 3, 2)  # per dim: logits, means, log-sigmas of the 2 components
        bias[:, 0], bias[:, 1], bias[:, 2] = 0.0, value, -8.0
    return model


def test_scheduled_sampling_feeds_m_its_own_draws() -> None:
    from dreamenv.train import scheduled_inputs

    model = _m_that_always_predicts(7.0)
    z, actions = torch.randn(64, 10, 4), torch.zeros(64, 10, 3)
    torch.testing.assert_close(scheduled_inputs(model, z, actions, 0.0), z)
    swapped = scheduled_inputs(model, z, actions, 1.0)
    torch.testing.assert_close(swapped[:, 0], z[:, 0])  # the first input has no draw before it
    torch.testing.assert_close(swapped[:, 1:], torch.full_like(z[:, 1:], 7.0), atol=1e-2, rtol=0)
    half = scheduled_inputs(model, z, actions, 0.5)
    own = (half[:, 1:] - 7.0).abs().amax(-1) < 1e-2
    kept = (half[:, 1:] == z[:, 1:]).all(-1)
    assert bool((own ^ kept).all()) and 0.4 < own.float().mean().item() < 0.6  # each input whole, about half swapped
    with pytest.raises(ValueError, match="scheduled_sampling"):
        dreamenv.train.MDNRNNConfig(scheduled_sampling=1.5)


def test_m_trains_with_scheduled_sampling(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swapped_with: list[float] = []
    swap = dreamenv.train.scheduled_inputs
    monkeypatch.setattr(dreamenv.train, "scheduled_inputs", lambda *args: swapped_with.append(args[3]) or swap(*args))
    config = tiny_train_config()
    train_world_model([tiny.rollouts], tmp_path / "tf", config, vae_from=tiny.bundle, progress=False)
    assert swapped_with == []  # the paper's M: teacher forcing only
    config.mdnrnn.scheduled_sampling = 0.5
    train_world_model([tiny.rollouts], tmp_path / "ss", config, vae_from=tiny.bundle, progress=False)
    assert swapped_with and set(swapped_with) == {0.5}  # training swaps, with the recipe's probability
    assert json.dumps(read_manifest(tmp_path / "ss")).count('"scheduled_sampling": 0.5') == 1  # the recipe records it


def test_hit_head_learns_from_the_stores_game_variables(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """[train.mdnrnn] hit_weight trains a hit head from stores that hold game variables, and refuses stores without."""
    from safetensors.torch import load_file

    from dreamenv.data.collect import collect
    from tests.tiny_envs import HEALTH_ID, MODULE

    rollouts = collect(f"{MODULE}:{HEALTH_ID}", tmp_path / "health.h5", 12, episodes_per_shard=6, backend="serial",
                       progress=False)
    config = tiny_train_config()
    config.mdnrnn.hit_weight = 1.0
    wm = train_world_model(rollouts, tmp_path / "bundle", config, progress=False)
    assert {"hit_head.weight", "hit_head.bias"} <= set(load_file(str(tmp_path / "bundle.work" / "mdnrnn" / "model.safetensors")))
    assert WorldModel.load(tmp_path / "bundle").fingerprint == wm.fingerprint
    assert read_manifest(tmp_path / "bundle")["info"]["recipe"]["mdnrnn"]["hit_weight"] == 1.0
    with pytest.raises(ValueError, match="hit_weight needs hit flags"):
        train_world_model(tiny_discrete.rollouts, tmp_path / "pixels", config, vae_from=tiny_discrete.bundle, progress=False)
