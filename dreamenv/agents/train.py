"""Train any agent family in a bundle's dream from its recipe table: the one entry point behind `dreamenv train-agent`
and the agent rounds of `dreamenv iterate`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

ALGO_TABLES = {"cmaes": "controller", "dagger": "dagger", "actor-critic": "actor_critic", "ppo": "ppo", "sac": "sac"}  # algo -> recipe table


def train_agent(algo: str, bundle: str | Path, out: str | Path, settings: dict[str, Any], timesteps: int | None = None) -> None:
    """Train `algo` in the dream of `bundle` into `out` (rerun to resume) with the settings of its recipe table;
    timesteps (PPO, SAC, actor-critic) is the budget in dream steps, over the table's own."""
    if algo not in ALGO_TABLES:
        raise ValueError(f"unknown algo {algo!r}: one of {', '.join(ALGO_TABLES)}")
    if algo == "cmaes":
        from dreamenv.agents.controller import CMAESConfig, train_controller

        if timesteps is not None:
            raise ValueError("CMA-ES takes its budget from population, rollouts and generations, not timesteps")
        train_controller(bundle, out, CMAESConfig(**settings))
    elif algo == "dagger":
        from dreamenv.agents.dagger import DAggerConfig, train_dagger

        if timesteps is not None:
            raise ValueError("DAgger takes its budget from rounds and dreams, not timesteps")
        train_dagger(bundle, out, DAggerConfig.from_dict(settings))
    elif algo == "actor-critic":
        from dreamenv.agents.actor_critic import ActorCriticConfig, train_actor_critic

        config = ActorCriticConfig.from_dict(settings)
        if timesteps is not None:  # imagined steps -> updates of batch x horizon steps each
            config.iterations = -(-timesteps // (config.batch * config.horizon))
        train_actor_critic(bundle, out, config)
    else:
        from dreamenv.agents.sb3 import PPOConfig, SACConfig, train_sb3

        config_class = {"ppo": PPOConfig, "sac": SACConfig}[algo]
        train_sb3(bundle, out, config_class.from_dict({**settings, **({} if timesteps is None else {"timesteps": timesteps})}))
