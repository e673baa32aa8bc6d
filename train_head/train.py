"""``nearid-train-head`` (also ``python -m train_head``): train the NearID MAP head on a frozen SigLIP backbone.

Runs on the CPU, one GPU or several GPUs through ``accelerate`` (launch it with ``accelerate launch -m train_head``
for DDP). The head starts from the backbone's own pooling head, so step 0 is the frozen baseline. With the default
feature cache the frozen backbone encodes every image once and later steps train the head on cached tokens.

Output folder::

    checkpoint-<step>/      head/ + optimizer (safetensors + JSON), schedule, RNG (JSON) + trainer_state.json
    best/                   head with the best validation SSR so far (head-only format)
    final/                  head after the last step (head-only format)
    splits/                 the identity splits used ({"indices": [...]})
    history.jsonl           training and validation records (appended, fsynced)
    train_config.json       the full configuration
    logs/                   tracker output (tensorboard / wandb)

Every head folder loads with ``NearIDModel.from_pretrained``.

The options are declared by :class:`train_head.config.TrainConfig`, the loop lives in :mod:`train_head.loop` and the
checkpoints in :mod:`train_head.checkpointing`; this module is the command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from nearid_reward.cli.entry_points import entry_point

from .checkpointing import TRAINER_STATE, find_latest_checkpoint
from .config import PROG, TrainConfig, build_parser, parse_train_config
from .loop import TrainState, train

logger = logging.getLogger(__name__)

__all__ = ["TRAINER_STATE", "TrainConfig", "TrainState", "build_parser", "find_latest_checkpoint", "main", "train"]


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    config = parse_train_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train(config)
    logger.info("done: %s", json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
