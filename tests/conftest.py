"""Shared fixtures: the tiny test envs are registered by importing tests.tiny_envs."""
from __future__ import annotations

import tests.tiny_envs  # noqa: F401  (registers DreamenvTest/* ids)
