"""Stand-in for ``flow_factory.rewards.registry``: a reward is a registry name or any dotted class path."""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, str] = {}


def get_reward_model_class(identifier: str) -> type:
    """The class a YAML ``reward_model:`` names; a failure is an ImportError carrying the cause."""
    path = _REGISTRY.get(identifier.lower(), identifier)
    try:
        module_name, class_name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ImportError(f"Could not load reward model {identifier!r}: {exc}") from exc
