"""Stand-in for ``flow_factory.hparams``: ``RewardArguments`` with ``extra_kwargs`` for unknown YAML keys."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RewardArguments:
    """One reward entry of a Flow-Factory YAML (name, class, weight, dtype, device, batch size, extra keys)."""

    name: str = "default"
    reward_model: str | None = None
    weight: float = 1.0
    dtype: Any = "bfloat16"
    device: Any = "cuda"
    batch_size: int = 16
    extra_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = _DTYPES[self.dtype]
        if isinstance(self.device, str):
            self.device = torch.device(self.device)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> RewardArguments:
        """Known keys fill the fields; every other key goes to ``extra_kwargs``, as Flow-Factory's YAML loader does."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in entry.items() if k not in known}
        values = {k: v for k, v in entry.items() if k in known}
        values["extra_kwargs"] = {**extra, **values.get("extra_kwargs", {})}
        return cls(**values)
