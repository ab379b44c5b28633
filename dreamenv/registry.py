"""Bundles -> Gymnasium ids: the shipped checkpoints, and register_bundle() for a user's own world model."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import gymnasium as gym

from dreamenv.worldmodel import BundleError, WorldModel, read_manifest

CHECKPOINTS = Path(__file__).parent / "checkpoints"


def shipped_names() -> list[str]:
    """Names of the bundles shipped as package data (e.g. 'VizdoomTakeCover')."""
    if not CHECKPOINTS.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS.iterdir() if (p / "bundle" / "manifest.json").is_file())


def env_name(env_id: str) -> str:
    """'VizdoomTakeCover-v1' -> 'VizdoomTakeCover': the name used in Dream-<name>-v0."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1])


def _resolve(item: str | Path, part: str, marker: str, directory: str, error: type[Exception] = FileNotFoundError) -> Path:
    """`item` as an existing path, or else checkpoints/<item>/<part> when it holds `marker`; otherwise `error`,
    naming `directory` (what a path should be) and the shipped names that have such a part."""
    path = Path(item).expanduser()
    if path.exists():
        return path.resolve()
    shipped = CHECKPOINTS / str(item) / part
    if (shipped / marker).is_file():
        return shipped
    names = ", ".join(n for n in shipped_names() if (CHECKPOINTS / n / part / marker).is_file()) or "none"
    raise error(f"{item!r} is neither {directory} nor a shipped {part} name (shipped: {names}).")


def resolve_bundle(bundle: str | Path) -> Path:
    """A bundle directory, or the shipped bundle of that name; BundleError when it is neither."""
    return _resolve(bundle, "bundle", "manifest.json", "a bundle directory", BundleError)


def resolve_controller(controller: str | Path) -> Path:
    """A controller directory, or the shipped controller of that name."""
    return _resolve(controller, "controller", "controller.json", "a controller directory")


def resolve_agent(agent: str | Path) -> Path:
    """A `dreamenv train-agent` directory, or the agent shipped beside the bundle of that name."""
    return _resolve(agent, "agent", "agent.json", "an agent directory (written by `dreamenv train-agent`)")


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> WorldModel:
    return WorldModel.load(path)


def load_world_model(bundle: str | Path | WorldModel) -> WorldModel:
    """Load (once per process) the world model of a bundle directory or shipped name."""
    if isinstance(bundle, WorldModel):
        return bundle
    path = resolve_bundle(bundle)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        read_manifest(path)  # raises the clear "not a bundle" error
    return _load_cached(str(path), manifest.stat().st_mtime_ns)


def register_bundle(
    bundle: str | Path, name: str | None = None, temperature: float | None = None
) -> tuple[str, str]:
    """Register Dream-<name>-v0 and Real-<name>-v0 for a bundle; returns the two ids."""
    path = resolve_bundle(bundle)
    manifest = read_manifest(path)
    name = name or env_name(manifest["env_id"])
    source = str(bundle) if not Path(str(bundle)).exists() else str(path)  # shipped names stay names
    dream_id, real_id = f"Dream-{name}-v0", f"Real-{name}-v0"
    dream_kwargs = {"bundle": source}
    if temperature is not None:
        dream_kwargs["temperature"] = float(temperature)
    gym.register(
        dream_id,
        entry_point="dreamenv.envs.dream:DreamEnv",
        vector_entry_point="dreamenv.envs.vector:DreamVectorEnv",
        max_episode_steps=int(manifest["max_episode_steps"]),
        kwargs=dream_kwargs,
    )
    gym.register(
        real_id,
        entry_point="dreamenv.envs.real:RealEnv",
        max_episode_steps=int(manifest["max_episode_steps"]),
        kwargs={"bundle": source},
    )
    return dream_id, real_id


def register_shipped() -> list[str]:
    """Register the ids of every shipped bundle (called on `import dreamenv`)."""
    ids: list[str] = []
    for name in shipped_names():
        ids.extend(register_bundle(name, name))
    return ids
