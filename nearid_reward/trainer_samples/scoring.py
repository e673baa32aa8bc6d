"""``SampleScorer``: score a trainer's sample rounds against the reference photos and pick its checkpoint.

Each round (the images of one step) is scored once with :class:`~nearid_reward.IdentityValidator`, with the same
metrics, history and summary as ``nearid-dreambooth``: ``identity_history.jsonl`` (one line per round, appended and
fsynced), ``identity_summary.md`` / ``.png``; the base-model round (step 0, SimpleTuner's ``benchmarks/base_model``)
gives every later round its ``base_identity_mean`` and ``identity_gain``. ``identity_samples.json`` holds every
round with its checkpoint (or none), the best round and the winner: the best round whose checkpoint exists, copied
to ``best_identity/`` under its own file name.

:meth:`SampleScorer.poll` does one pass and can be called again and again while the trainer writes (``--watch``):
it lists only what is new, scores a round once it is complete (a later round has begun, it has as many images as
the first complete round, or the run has finished), retries a round whose images cannot be read yet (half-written)
instead of scoring it, and copies a new winner as soon as its checkpoint is complete on disk, also when the
checkpoint appears after the round was scored. A round's images are loaded, scored and dropped, so memory does not
grow with the number of rounds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .._version import __version__
from ..files import remove_stale_temporaries, write_json_atomic, write_text_atomic
from ..images import load_image
from ..results import plot_identity_history, summary_markdown
from ..validation import IdentityValidator
from .checkpoints import (
    TrainerCheckpoint,
    checkpoint_complete,
    copy_winner,
    find_trainer_checkpoints,
    match_checkpoint,
)
from .layouts import TRAINERS, RoundKey, SampleFile, layout_roots, scan_samples

logger = logging.getLogger(__name__)

__all__ = ["SamplesConfig", "SampleScorer", "follow", "HISTORY_NAME", "SUMMARY_NAME", "RESULT_NAME", "WINNER_DIR"]

HISTORY_NAME = "identity_history.jsonl"
SUMMARY_NAME = "identity_summary"
RESULT_NAME = "identity_samples.json"
WINNER_DIR = "best_identity"
RESULT_FORMAT = "nearid-samples"
_SOURCE = "samples:"


@dataclass
class SamplesConfig:
    """Options of :class:`SampleScorer`.

    Attributes:
        trainer: the sample layout, one of :data:`~.layouts.TRAINERS`.
        samples_dir: the folder the trainer writes its samples to.
        checkpoints_dir: the folder it saves models to (see :func:`~.checkpoints.find_trainer_checkpoints`).
        output_dir: where the history, summary, result JSON and ``best_identity/`` go.
        class_prompt_start: sample prompts from this index on are class prompts (scored as class-prompt leakage,
            not identity); the shipped prompt set written by ``nearid-prompts`` has its class prompts from index 8.
            SimpleTuner shortnames starting with ``class_`` are class prompts too. None: every prompt shows the
            subject.
        variant: which of OneTrainer's sample sets to score: ``""`` (the default samples, EMA weights when EMA is
            on), ``"no-ema"`` or ``"custom"``.
        images_per_round: a round with this many images is complete (None: learnt from the first complete round).
        copy_winner: copy the winner's checkpoint to ``winner_dir``.
        winner_dir: default ``output_dir/best_identity``.
        plot: write ``identity_summary.png`` (needs matplotlib).
        output_interval: while watching, ``identity_samples.json`` and the summary (which hold every round, so
            rewriting them costs time in proportion to the rounds) are rewritten at most this often, in seconds,
            and always when a winner is copied and at the end; the history gets its line at once.
    """

    trainer: str
    samples_dir: Path
    checkpoints_dir: Path
    output_dir: Path
    class_prompt_start: int | None = None
    variant: Literal["", "no-ema", "custom"] = ""
    images_per_round: int | None = None
    copy_winner: bool = False
    winner_dir: Path | None = None
    plot: bool = True
    output_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"SamplesConfig.trainer must be one of {', '.join(TRAINERS)}; got {self.trainer!r}")
        if self.variant not in ("", "no-ema", "custom"):
            raise ValueError(f"SamplesConfig.variant must be '', 'no-ema' or 'custom'; got {self.variant!r}")
        if self.images_per_round is not None and self.images_per_round < 1:
            raise ValueError(f"SamplesConfig.images_per_round must be >= 1 or None; got {self.images_per_round}")
        self.samples_dir, self.checkpoints_dir, self.output_dir = (
            Path(self.samples_dir), Path(self.checkpoints_dir), Path(self.output_dir))
        self.winner_dir = Path(self.winner_dir) if self.winner_dir is not None else self.output_dir / WINNER_DIR


@dataclass
class _Round:
    key: RoundKey
    files: list[SampleFile] = field(default_factory=list)
    row: dict[str, Any] | None = None  # set once scored
    checkpoint: TrainerCheckpoint | None = None
    loaded: dict[str, Image.Image] = field(default_factory=dict)  # read while another image was not readable yet
    num_files: int = 0


class SampleScorer:
    """Score the sample rounds of a trainer run and keep its best checkpoint (see the module docstring).

    Args:
        validator: scores images against the subject's references; its ``history_path`` should be
            ``output_dir/identity_history.jsonl`` (rounds already in that history are not scored again).
        config: a :class:`SamplesConfig`.

    Example:
        >>> config = SamplesConfig("kohya", "run/sample", "run", "run/nearid", copy_winner=True)   # doctest: +SKIP
        >>> scorer = SampleScorer(validator, config)                                                # doctest: +SKIP
        >>> scorer.poll(finished=True); scorer.result()["winner"]["checkpoint"]                     # doctest: +SKIP
        'run/dog-step00000600.safetensors'
    """

    def __init__(self, validator: IdentityValidator, config: SamplesConfig) -> None:
        self.validator = validator
        self.config = config
        self.rounds: dict[RoundKey, _Round] = {}
        self.known: set[str] = set()
        self.ignored: list[str] = []  # other OneTrainer sample sets
        self.late: list[str] = []  # files that arrived after their round was scored
        self.unparsed: list[str] = []
        self.unreadable: list[str] = []
        self.expected: int | None = config.images_per_round
        self.base_images: list[Image.Image] | None = None
        self.base_row: dict[str, Any] | None = None
        self.winner: dict[str, Any] | None = None  # the copied round's row
        self.loaded_files = 0  # sample images loaded for scoring (each once)
        self._metadata_cache: dict[str, tuple[tuple[int, int], dict[str, str] | None]] = {}
        self._checkpoints: list[TrainerCheckpoint] = []
        self._resumed: dict[str, dict[str, Any]] = {}
        self._written_at = -math.inf
        prefix = validator.config.prefix
        for record in validator.history:
            source = str(record.get("source", ""))
            if source.startswith(_SOURCE):
                self._resumed[source[len(_SOURCE):]] = {
                    "step": record.get("step"), **{k[len(prefix):]: v for k, v in record.items()
                                                   if k.startswith(prefix) and isinstance(v, (int, float))}}
        remove_stale_temporaries(config.output_dir)
        if config.winner_dir is not None:
            remove_stale_temporaries(config.winner_dir.parent)
            self.winner = self._previous_winner(config.winner_dir)

    def _previous_winner(self, folder: Path) -> dict[str, Any] | None:
        """The winner an earlier run copied to ``folder`` (same monitor and mode), so that a rerun replaces it only
        with a better round: its checkpoint may have been pruned by the trainer since."""
        try:
            data = json.loads((folder / "identity_scores.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("selected_by") != RESULT_FORMAT or not isinstance(
                data.get("round"), dict):
            return None
        if data.get("monitor") != self.monitor or data.get("mode") != self.validator.config.mode:
            return None
        return {**data["round"], "checkpoint": data.get("source")}

    # ------------------------------------------------------------------ scanning
    def _scan(self) -> None:
        samples, unparsed = scan_samples(self.config.samples_dir, self.config.trainer, known=self.known,
                                         skip=(self.config.output_dir,))
        self.known.update(unparsed)
        self.unparsed.extend(unparsed)
        for sample in samples:
            self.known.add(sample.relpath)
            if sample.round.variant != self.config.variant:
                self.ignored.append(sample.relpath)
                continue
            item = self.rounds.setdefault(sample.round, _Round(sample.round))
            if item.row is not None:
                logger.warning("%s arrived after its round (%s) was scored: not scored", sample.relpath,
                               sample.round.label)
                self.late.append(sample.relpath)
                continue
            item.files.append(sample)
            item.num_files += 1
        self._checkpoints = find_trainer_checkpoints(self.config.checkpoints_dir, self.config.trainer,
                                                     metadata_cache=self._metadata_cache)
        # candidates by step, epoch and final, so matching every round is linear in rounds + checkpoints
        by_number: dict[tuple[str, int], list[TrainerCheckpoint]] = {}
        for checkpoint in self._checkpoints:
            if checkpoint.step is not None:
                by_number.setdefault(("step", checkpoint.step), []).append(checkpoint)
            if checkpoint.epoch is not None:
                by_number.setdefault(("epoch", checkpoint.epoch), []).append(checkpoint)
            if checkpoint.final:
                by_number.setdefault(("final", 0), []).append(checkpoint)
        for item in self.rounds.values():
            found = match_checkpoint(item.key, by_number.get((item.key.kind, item.key.number), ()))
            if found is not None:  # a pruned checkpoint stays known (its copy may be the winner)
                item.checkpoint = found

    def _is_class(self, sample: SampleFile) -> bool:
        start = self.config.class_prompt_start
        if start is not None and sample.prompt_index is not None:
            return sample.prompt_index >= start
        return sample.prompt_index is None and sample.prompt.startswith("class_")

    def _ready(self, item: _Round, later: bool, finished: bool) -> bool:
        full = self.expected is not None and item.num_files >= self.expected and item.key.kind != "final"
        if not (finished or later or full):
            return False
        # an epoch round waits for the checkpoint that tells its step (or for the end of the run)
        return item.key.kind != "epoch" or finished or item.checkpoint is not None

    def _load(self, item: _Round, files: Sequence[SampleFile],
              finished: bool) -> list[tuple[SampleFile, Image.Image]] | None:
        """The round's images with their files, or None when one cannot be read yet (the round is retried then;
        the images already read are kept with the round, so every file is read once)."""
        root = layout_roots(self.config.samples_dir, self.config.trainer)
        for sample in files:
            if sample.relpath in item.loaded:
                continue
            try:
                item.loaded[sample.relpath] = load_image(root / sample.relpath)
                self.loaded_files += 1
            except (ValueError, OSError) as exc:
                if not finished:
                    logger.info("%s is not readable yet (%s): its round waits for the next poll", sample.relpath, exc)
                    return None
                logger.warning("skipping unreadable sample %s: %s", sample.relpath, exc)
                self.unreadable.append(sample.relpath)
        loaded = [(s, item.loaded[s.relpath]) for s in files if s.relpath in item.loaded]
        item.loaded = {}  # scored now: the images are dropped
        return loaded

    # ------------------------------------------------------------------ scoring
    def _step_of(self, item: _Round) -> int | None:
        if item.key.kind == "step":
            return item.key.number
        if item.checkpoint is not None and item.checkpoint.step is not None:
            return item.checkpoint.step
        if item.key.kind == "final":  # the last step seen: the final samples come after it
            steps = [r.row["step"] for r in self.rounds.values() if r.row and r.row.get("step") is not None]
            return max(steps, default=None)
        return None

    def _score(self, item: _Round, finished: bool) -> bool:
        files = sorted(item.files, key=lambda s: s.sort_key())
        label = item.key.label
        if item.key.kind == "base":
            loaded = self._load(item, [s for s in files if not self._is_class(s)], finished)
            if loaded is None:
                return False
            if loaded:
                self.base_images = [image for _, image in loaded]
                self.base_row = {"round": label, "step": 0, **dict(self.validator.compute(self.base_images)),
                                 "num_files": len(files)}
            item.row = self.base_row or {"round": label, "step": 0}
            item.files = []
            return True
        step = self._step_of(item)
        if label in self._resumed:
            item.row = {"round": label, **self._resumed[label], "resumed": True}
        else:
            loaded = self._load(item, files, finished)
            if loaded is None:
                return False
            images = [image for sample, image in loaded if not self._is_class(sample)]
            class_images = [image for sample, image in loaded if self._is_class(sample)]
            if not images:
                logger.warning("round %s has no identity-prompt images: not scored", label)
                item.row = {"round": label, "step": step, "num_files": len(files)}
                item.files = []
                return True
            kwargs: dict[str, Any] = {"class_images": class_images or None, "base_images": self.base_images}
            if step is not None:
                logged = self.validator.validate(images, step=step, source=_SOURCE + label, **kwargs)
                prefix = self.validator.config.prefix
                metrics = {k[len(prefix):]: v for k, v in logged.items()
                           if k.startswith(prefix) and k[len(prefix):] not in ("best_value", "is_best")}
            else:  # an epoch round whose step no checkpoint tells: scored, kept out of the step history
                metrics = dict(self.validator.compute(images, **kwargs))
            item.row = {"round": label, "step": step, **metrics}
        item.row.update(kind=item.key.kind, number=item.key.number, num_files=len(files))
        item.files = []  # scored: only the count is kept
        if item.key.kind == "epoch":
            item.row["epoch"] = item.key.number
        logger.info("scored %s: %s=%.4f", label, self.monitor, float(item.row.get(self.monitor, math.nan)))
        return True

    @property
    def monitor(self) -> str:
        return self.validator.config.monitor

    def _value(self, row: dict[str, Any]) -> float | None:
        value = row.get(self.monitor)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None

    def ranked(self) -> list[_Round]:
        """Scored rounds (not the base) that have the monitored metric, best first (ties: the earlier round)."""
        rows = [r for r in self.rounds.values() if r.row is not None and r.key.kind != "base"
                and self._value(r.row) is not None]
        sign = -1.0 if self.validator.config.mode == "max" else 1.0
        return sorted(rows, key=lambda r: (sign * self._value(r.row), r.key.sort_key()))  # type: ignore[arg-type]

    def _better(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        va, vb = self._value(a), self._value(b)
        if va is None or vb is None:
            return vb is None and va is not None
        return va > vb if self.validator.config.mode == "max" else va < vb

    def _update_winner(self) -> bool:
        """Copy the best scored round whose checkpoint is complete, when it beats the copied one."""
        if not self.config.copy_winner:
            return False
        for item in self.ranked():
            if self.winner is not None and not self._better(item.row, self.winner):  # type: ignore[arg-type]
                return False  # the copied winner is still the best that can be copied
            if item.checkpoint is None or not checkpoint_complete(item.checkpoint):
                continue  # listed as without checkpoint (or waited for), never replaced by a neighbour
            scores = {"selected_by": RESULT_FORMAT, "monitor": self.monitor, "mode": self.validator.config.mode,
                      "round": item.row}
            try:
                copy_winner(item.checkpoint, self.config.winner_dir, scores)  # type: ignore[arg-type]
            except (OSError, ValueError) as exc:  # CheckpointError: pruned or rewritten while being copied
                logger.warning("could not copy %s (%s): trying again at the next poll", item.checkpoint.path, exc)
                continue
            self.winner = {**item.row, "checkpoint": str(item.checkpoint.path)}  # type: ignore[dict-item]
            logger.info("new best checkpoint %s (%s) copied to %s", item.checkpoint.path, item.key.label,
                        self.config.winner_dir)
            return True
        return False

    def poll(self, *, finished: bool = False) -> list[dict[str, Any]]:
        """One pass: list new files, score the rounds that are complete, copy a new winner, rewrite the outputs.

        Args:
            finished: the run has finished: every round is complete, and images that still cannot be read are
                skipped (listed under ``unreadable``) instead of waited for.

        Returns:
            The rows of the rounds scored in this pass, in order.
        """
        self._scan()
        keys = sorted(self.rounds, key=lambda k: k.sort_key())  # the base round first: later rounds get its gain
        last_of_kind = {key.kind: position for position, key in enumerate(keys)}
        scored: list[dict[str, Any]] = []
        for position, key in enumerate(keys):
            item = self.rounds[key]
            if item.row is not None:
                continue
            later = last_of_kind[key.kind] > position or (key.kind == "base" and len(keys) > 1)
            if not self._ready(item, later, finished):
                continue
            if not self._score(item, finished):
                break  # a later round waits too, so the history stays in step order
            if later and self.expected is None and key.kind != "base":
                self.expected = item.num_files
            scored.append(item.row)  # type: ignore[arg-type]
        copied = self._update_winner()
        due = scored and time.monotonic() - self._written_at >= self.config.output_interval
        if copied or finished or due:
            self.write_outputs()
        return scored

    # ------------------------------------------------------------------ outputs
    def result(self) -> dict[str, Any]:
        """Everything ``identity_samples.json`` holds (and ``--json`` prints)."""
        rounds = []
        for key in sorted(self.rounds, key=lambda k: k.sort_key()):
            item = self.rounds[key]
            rounds.append({"round": key.label, "kind": key.kind, "number": key.number, "variant": key.variant,
                           "num_files": item.num_files, "scored": item.row is not None,
                           "checkpoint": None if item.checkpoint is None else str(item.checkpoint.path),
                           **({} if item.row is None else {k: v for k, v in item.row.items()
                                                           if k not in ("round", "kind", "number", "num_files")})})
        ranked = self.ranked()
        best = None
        if ranked:
            top = ranked[0]
            best = {**(top.row or {}), "checkpoint": None if top.checkpoint is None else str(top.checkpoint.path)}
        refs = self.validator.references
        return {
            "format": RESULT_FORMAT,
            "version": 1,
            "library_version": __version__,
            "trainer": self.config.trainer,
            "samples_dir": str(self.config.samples_dir),
            "checkpoints_dir": str(self.config.checkpoints_dir),
            "monitor": self.monitor,
            "mode": self.validator.config.mode,
            "reference_oracle": refs.oracle if refs.num_references >= 2 else None,
            "base": self.base_row,
            "rounds": rounds,
            "best": best,
            "winner": self.winner,
            "winner_dir": str(self.config.winner_dir) if self.winner is not None else None,
            "without_checkpoint": [r["round"] for r in rounds if r["checkpoint"] is None and r["kind"] != "base"
                                   and r["scored"]],
            "unparsed_files": self.unparsed[:100],
            "unreadable_files": self.unreadable,
            "ignored_files": len(self.ignored),
            "late_files": self.late,
        }

    def write_outputs(self) -> dict[str, Path]:
        """Rewrite ``identity_samples.json`` and ``identity_summary.md`` / ``.png`` (atomically)."""
        self._written_at = time.monotonic()
        out = self.config.output_dir
        files = {"json": out / RESULT_NAME, "summary": out / f"{SUMMARY_NAME}.md"}
        write_json_atomic(files["json"], self.result())
        v = self.validator
        records = list(v.history)
        text = summary_markdown(records, prefix=v.config.prefix, title=f"NearID identity of the samples in "
                                f"{self.config.samples_dir}", best_step=v.best_step, best_value=v.best_value,
                                monitor_key=v.monitor_key)  # fmt: skip
        write_text_atomic(files["summary"], text)
        if self.config.plot and records:
            png = plot_identity_history(records, out / f"{SUMMARY_NAME}.png", prefix=v.config.prefix,
                                        oracle=v.references.oracle, best_step=v.best_step)
            if png is not None:
                files["png"] = png
        return files


def history_path(output_dir: str | os.PathLike[str]) -> Path:
    """``output_dir/identity_history.jsonl``."""
    return Path(output_dir) / HISTORY_NAME


def follow(
    scorer: SampleScorer,
    *,
    poll_interval: float = 30.0,
    until_file: str | os.PathLike[str] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Poll ``scorer`` every ``poll_interval`` seconds until the run has finished, then do the final pass.

    The run has finished when ``until_file`` exists (a file the user or the training script creates at the end,
    e.g. ``touch run/DONE`` after the trainer's command) or ``stop`` is set. Ctrl-C raises ``KeyboardInterrupt``
    between two passes or inside one; every file written before it is whole (rows are appended, outputs renamed
    into place).
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
    done = Path(until_file) if until_file is not None else None
    event = stop if stop is not None else threading.Event()
    while True:
        finished = event.is_set() or (done is not None and done.exists())
        scorer.poll(finished=finished)
        if finished:
            return
        event.wait(poll_interval)
