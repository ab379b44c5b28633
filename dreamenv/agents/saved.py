"""A `dreamenv train-agent` directory: agent.json (algo, env id, bundle fingerprint, training settings) beside the
algorithm's own weights (SB3's model.zip, the actor-critic's safetensors), and loading it by its algo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreamenv.registry import resolve_agent
from dreamenv.worldmodel import WorldModel, package_version

AGENT_FORMAT = "dreamenv-agent"
AGENT_FILE = "agent.json"


def write_agent_info(out: Path, algo: str, world_model: WorldModel, bundle: str, info: dict[str, Any]) -> None:
    """Write out/agent.json: what was trained, on which bundle, with which package versions, plus `info`."""
    meta = {"format": AGENT_FORMAT, "format_version": 1, "algo": algo, "env_id": world_model.env_id, "bundle": bundle,
            "bundle_fingerprint": world_model.fingerprint, "trained_in": "dream", **info,
            "versions": {"dreamenv": package_version("dreamenv"), "stable_baselines3": package_version("stable-baselines3"),
                         "torch": package_version("torch")}}
    write_agent_json(out, meta)


def write_agent_json(out: Path, meta: dict[str, Any]) -> None:
    """Write `meta` as out/agent.json through a temporary name (a kill never leaves half a file)."""
    (out / "agent.tmp.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "agent.tmp.json").replace(out / AGENT_FILE)


def read_agent_info(path: str | Path) -> dict[str, Any]:
    """The agent.json of a `dreamenv train-agent` directory, checked for format."""
    meta_path = Path(path) / AGENT_FILE
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != AGENT_FORMAT or meta.get("format_version", 0) > 1:
        raise ValueError(f"{meta_path}: not an agent this dreamenv can read (format {meta.get('format')} v{meta.get('format_version')})")
    return meta


def check_agent_bundle(meta: dict[str, Any], world_model: WorldModel, where: str | Path) -> None:
    """Raise ValueError unless the agent described by `meta` was trained on `world_model`."""
    if meta.get("bundle_fingerprint") != world_model.fingerprint:
        raise ValueError(
            f"{where} holds an agent trained on another world model ({meta.get('env_id')}, bundle "
            f"{str(meta.get('bundle_fingerprint'))[:12]}) than this bundle ({world_model.env_id}, {world_model.fingerprint[:12]}): "
            "train one on this bundle (dreamenv train-agent BUNDLE --out DIR)"
        )


def load_agent(agent: str | Path, algo: str | None = None, world_model: WorldModel | None = None) -> Any:
    """The policy of a `dreamenv train-agent` directory or a shipped agent's name (predict(obs, deterministic=True)),
    checked against `world_model` when given."""
    path = resolve_agent(agent)
    meta = read_agent_info(path)
    if algo not in (None, meta["algo"]):
        raise ValueError(f"{path} holds a {meta['algo']} agent, not {algo}: drop --algo or pass --algo {meta['algo']}")
    if world_model is not None:
        check_agent_bundle(meta, world_model, path)
    if meta["algo"] == "actor-critic" and "members" in meta:
        from dreamenv.agents.ensemble import load_ensemble

        return load_ensemble(path, meta)
    if meta["algo"] == "actor-critic":
        from dreamenv.agents.actor_critic import ActorCriticPolicy

        return ActorCriticPolicy.load(path)
    from dreamenv.agents.sb3 import MODEL_FILE, load_sb3_zip

    return load_sb3_zip(Path(path) / MODEL_FILE, meta["algo"])
