"""Several actor-critics trained in the same dream as one policy that acts on the mean of their action distributions.

Seeds of the same recipe may overrate different corners of the dream; averaging what they would do keeps the choices
they agree on (docs/agents.md measures it on TakeCover). An ensemble is an agent directory like any other (agent.json,
algo "actor-critic") whose members are the actor-critic directories under it, so load_agent, compare, collect and the
registry take it unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch

from dreamenv.agents.actor_critic import WEIGHTS_FILE, ActorCriticPolicy, check_obs_width
from dreamenv.agents.saved import AGENT_FILE, read_agent_info, write_agent_json
from dreamenv.registry import resolve_agent


class ActorCriticEnsemble:
    """Actor-critics of one dream as one policy: Discrete actions from the mean of their probabilities, Box actions the
    mean of their modes (deterministic) or a random member's sample (the mixture's sample)."""

    def __init__(self, members: Sequence[ActorCriticPolicy], info: dict[str, Any] | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 actor-critics, got {len(members)}")
        if any(member.action_space != members[0].action_space for member in members):
            raise ValueError("an ensemble's actor-critics must share one action space")
        if len({member.obs_mode for member in members}) != 1:
            raise ValueError("an ensemble's actor-critics must read one obs_mode, got "
                             f"{sorted({member.obs_mode for member in members})}")
        self.members = list(members)
        self.action_space = members[0].action_space
        self.head = members[0].head
        self.info = info or {}

    @property
    def obs_mode(self) -> str:
        """The observation every member reads: "latent" ([z, h]) or "latent_cell" ([z, c, h])."""
        return self.members[0].obs_mode

    @torch.inference_mode()
    def predict(self, observation: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, None]:
        """The mixture's most likely action (deterministic) or a sample, for one observation or a batch."""
        obs = torch.as_tensor(np.asarray(observation, np.float32))
        check_obs_width(obs, self.members[0].actor, self.obs_mode)
        flat = obs.reshape(-1, obs.shape[-1])
        outs = [(member.head, member.actor(flat)) for member in self.members]
        if isinstance(self.action_space, gym.spaces.Discrete):
            probs = torch.stack([head.distribution(out).probs for head, out in outs]).mean(0)
            chosen = probs.argmax(-1) if deterministic else torch.distributions.Categorical(probs=probs).sample()
        elif deterministic:
            chosen = torch.stack([head.mode(out) for head, out in outs]).mean(0)
        else:
            picks = torch.randint(0, len(outs), (len(flat),))  # torch's generator, as the members' own samples
            samples = torch.stack([head.distribution(out).sample() for head, out in outs])
            chosen = samples[picks, torch.arange(len(flat))]
        actions = self.head.to_env(chosen)
        return (actions[0] if obs.ndim == 1 else actions), None


def save_ensemble(out: str | Path, agents: Sequence[str | Path]) -> Path:
    """Copy actor-critic agent directories (or shipped names) trained on one bundle into `out` as one ensemble agent."""
    if len(agents) < 2:
        raise ValueError(f"an ensemble needs at least 2 actor-critic agents, got {len(agents)}")
    paths = [resolve_agent(agent) for agent in agents]
    metas = [read_agent_info(path) for path in paths]
    for path, meta in zip(paths, metas):
        if meta["algo"] != "actor-critic" or "members" in meta:
            raise ValueError(f"{path} holds a {meta['algo']}{' ensemble' if 'members' in meta else ''} agent: an "
                             "ensemble is made of single actor-critics (dreamenv train-agent --algo actor-critic)")
    fingerprints = {meta["bundle_fingerprint"] for meta in metas}
    if len(fingerprints) != 1:
        raise ValueError(f"the agents were trained on different bundles ({', '.join(sorted(f[:12] for f in fingerprints))}): "
                         "an ensemble's members must share the dream whose observations they read")
    ActorCriticEnsemble([ActorCriticPolicy.load(path) for path in paths])  # one action space and obs_mode, before writing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for number, path in enumerate(paths):
        name = f"member-{number}"
        (out / name).mkdir(exist_ok=True)
        for file in (AGENT_FILE, WEIGHTS_FILE):
            shutil.copyfile(path / file, out / name / file)
        names.append(name)
    shared = {key: metas[0][key] for key in ("format", "format_version", "algo", "env_id", "bundle", "bundle_fingerprint",
                                              "trained_in", "versions")}
    write_agent_json(out, {**shared, "members": names, "member_sources": [str(path) for path in paths]})
    return out


def load_ensemble(path: str | Path, meta: dict[str, Any]) -> ActorCriticEnsemble:
    """The ensemble policy of an ensemble agent directory."""
    return ActorCriticEnsemble([ActorCriticPolicy.load(Path(path) / name) for name in meta["members"]], meta)
