"""Deprecated alias of :mod:`nearid_reward.weight_formats` (removed in 0.3)."""

from __future__ import annotations

import warnings

from nearid_reward.weight_formats import *  # noqa: F401,F403
from nearid_reward.weight_formats import __all__  # noqa: F401

warnings.warn(f"{__name__} is deprecated: import from nearid_reward.weight_formats", DeprecationWarning, stacklevel=2)
