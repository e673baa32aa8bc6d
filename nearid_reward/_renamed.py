"""``nearid_reward.io``: the deprecated name of :mod:`nearid_reward.files` (removed in 0.3), served without a file.

A module file named ``io.py`` inside the package would shadow the standard library's ``io`` for any script run from
the package folder, so the old name is answered by a meta-path finder that only knows that one name: importing it
warns and returns a module that re-exports :mod:`nearid_reward.files`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["RENAMED_MODULES", "install"]

RENAMED_MODULES = {"nearid_reward.io": "nearid_reward.files"}
"""Old module name -> the module that replaced it."""


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        target = importlib.import_module(self.target)
        names = list(getattr(target, "__all__", ()))
        module.__dict__.update({name: getattr(target, name) for name in names})
        module.__all__ = names
        module.__doc__ = f"Deprecated alias of :mod:`{self.target}` (removed in 0.3)."
        warnings.warn(f"{module.__name__} is deprecated: import from {self.target}", DeprecationWarning,
                      stacklevel=2)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        new = RENAMED_MODULES.get(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder of the renamed modules on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
