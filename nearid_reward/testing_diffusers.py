"""Deprecated alias of :mod:`nearid_reward.testing.pipelines` (removed in 0.3)."""

from __future__ import annotations

import warnings

from nearid_reward.testing.pipelines import *  # noqa: F401,F403
from nearid_reward.testing.pipelines import __all__  # noqa: F401

warnings.warn(f"{__name__} is deprecated: import from nearid_reward.testing.pipelines", DeprecationWarning,
              stacklevel=2)
