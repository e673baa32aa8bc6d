"""Checkpoint selection by identity score: render a fixed prompt/seed set for every ``checkpoint-N`` of a run
with ONE pipeline (LoRA load/delete or hotswap; full UNet/transformer weights loaded in place), score, rank, and
write ``identity_selection.json`` / ``.csv`` / ``.png``.

A rerun skips checkpoints whose weights (SHA-256) and scoring settings are unchanged. Under ``accelerate launch``
the work is split between processes with ``PartialState.split_between_processes``; the main process gathers
(``accelerate.utils.gather_object``), ranks and writes. accelerate is imported lazily; the tables and plots come
from :mod:`nearid_reward.results`, the adapter slot from :mod:`nearid_reward.adapters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._version import __version__
from .adapters import LoraSlot, denoiser_of
from .files import (
    CheckpointError,
    load_safetensors,
    remove_stale_temporaries,
    replace_directory,
    swap_directory,
    temporary_path,
    write_json_atomic,
    write_text_atomic,
)
from .metrics import METRICS
from .pipelines import load_pipeline
from .rendering import PromptSet, RenderConfig, render_validation_set
from .results import SelectionResult, format_table, plot_selection, selection_csv
from .run_checkpoints import (
    LORA_WEIGHT_NAME,
    RunCheckpoint,
    content_hash,
    copy_checkpoint_weights,
    find_checkpoints,
)
from .validation import IdentityValidator

logger = logging.getLogger(__name__)

# SelectionResult and format_table live in .results, load_pipeline in .pipelines; they stay importable from here.
__all__ = [
    "SelectionConfig",
    "SelectionResult",
    "CheckpointSelector",
    "load_pipeline",
    "format_table",
    "SELECTION_JSON",
    "copy_guarded_order",
]

SELECTION_JSON = "identity_selection.json"
SELECTION_CSV = "identity_selection.csv"
SELECTION_PNG = "identity_selection.png"
SELECTION_FORMAT = "nearid-selection"
BASE_NAME = "base"


@dataclass
class SelectionConfig:
    """Options of :class:`CheckpointSelector`.

    Attributes:
        monitor: metric that ranks checkpoints (e.g. ``"identity_mean"``, ``"relative_mean"``, ``"identity_gain"``).
        mode: ``"max"`` or ``"min"``.
        render: rendering of the prompt set (steps, guidance, size, seeds, class prompts, base model).
        hotswap: replace LoRA weights in place (``load_lora_weights(..., hotswap=True)``) instead of deleting and
            loading an adapter per checkpoint; falls back to delete + load when a checkpoint cannot be hotswapped.
        use_cache: reuse results of checkpoints already scored with the same weights and settings.
        skip_invalid: skip checkpoint folders without usable weights (with a warning) instead of failing.
        weight_name: LoRA weights file name inside ``checkpoint-N``.
        adapter_name: adapter name used while a checkpoint is loaded.
        plot: write ``identity_selection.png``.
        winner: ``"copy"`` or ``"symlink"`` the winner's weights to ``winner_dir`` (None: leave them).
        winner_dir: where the winner goes (default ``output_dir/best_identity``).
        copy_guard: the copy guard (None: off): checkpoints whose ``context_copy_fraction`` exceeds it rank after
            every other checkpoint (see :func:`copy_guarded_order`); needs a validator with ``copy_guard`` set,
            which computes the signal. Meant for references taken in one place and prompts that ask for others.
    """

    monitor: str = "identity_mean"
    mode: Literal["max", "min"] = "max"
    render: RenderConfig = field(default_factory=RenderConfig)
    hotswap: bool = False
    use_cache: bool = True
    skip_invalid: bool = False
    weight_name: str = LORA_WEIGHT_NAME
    adapter_name: str = "nearid_select"
    plot: bool = True
    winner: Literal["copy", "symlink"] | None = None
    winner_dir: str | None = None
    copy_guard: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"SelectionConfig.mode must be 'max' or 'min', got {self.mode!r}")
        if self.winner not in (None, "copy", "symlink"):
            raise ValueError(f"SelectionConfig.winner must be 'copy', 'symlink' or None, got {self.winner!r}")
        if self.copy_guard is not None and not 0.0 <= self.copy_guard <= 1.0:
            raise ValueError(f"SelectionConfig.copy_guard must be in [0, 1] or None, got {self.copy_guard}")
        if not isinstance(self.render, RenderConfig):
            raise TypeError(f"SelectionConfig.render must be a RenderConfig, got {type(self.render).__name__}")


class CheckpointSelector:
    """Score every checkpoint of a training run with one pipeline and rank them by identity.

    Args:
        pipeline: a diffusers pipeline holding the *base* model (the one the run started from). It is loaded once;
            checkpoints are swapped into it.
        validator: scores images (its references, aggregation and thresholds); its history is not touched.
        prompts: a filled :class:`~nearid_reward.PromptSet`.
        config: a :class:`SelectionConfig`.
        state: an ``accelerate.PartialState`` (created when None and accelerate is installed).

    Example:
        >>> selector = CheckpointSelector(pipe, validator, PromptSet.default().fill("sks", "dog"))   # doctest: +SKIP
        >>> result = selector.run("runs/dog-lora"); result.winner["name"]                           # doctest: +SKIP
        'checkpoint-800'
    """

    def __init__(
        self,
        pipeline: Any,
        validator: IdentityValidator,
        prompts: PromptSet,
        *,
        config: SelectionConfig | None = None,
        state: Any = None,
    ) -> None:
        if prompts.has_placeholders:
            raise ValueError("`prompts` still has {token}/{class} placeholders: call prompts.fill(token, class_noun)")
        self.pipeline = pipeline
        self.validator = validator
        self.references = validator.references  # the subject's ReferenceSet, shared with the validator
        self.prompts = prompts
        self.config = config or SelectionConfig()
        self.state = state if state is not None else _partial_state()
        self.lora = LoraSlot(pipeline, adapter_name=self.config.adapter_name, hotswap=self.config.hotswap)

    # ------------------------------------------------------------------ settings and cache
    def settings(self) -> dict[str, Any]:
        """Everything that changes scores besides the checkpoint weights (the cache is keyed by it)."""
        vcfg = self.validator.config
        render = dataclasses.replace(self.config.render, render_base=False)
        return {
            "references_sha256": self.references.fingerprint(),
            "num_references": self.references.num_references,
            "num_negatives": self.references.num_negatives,
            "aggregate": self.references.aggregate,
            "negative_weight": self.validator.reward_config.negative_weight,
            "reward_kind": self.validator.reward_config.kind,
            "threshold": self.validator.threshold,
            "copy_margin": vcfg.copy_margin,
            "copy_signal": None if vcfg.copy_guard is None else {"context_margin": vcfg.context_margin},
            "prompts": self.prompts.to_dict(),
            "render": render.to_dict(),
            "base_model": str(getattr(self.pipeline, "name_or_path", "") or type(self.pipeline).__name__),
            "denoiser_dtype": str(denoiser_of(self.pipeline)[0].dtype),
        }

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _read_cache(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable selection cache %s: %s", path, exc)
            return {}
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            return {}
        rows = {r["name"]: r for r in data.get("checkpoints", []) if isinstance(r, dict) and "name" in r}
        if isinstance(data.get("base"), dict):
            rows[BASE_NAME] = data["base"]
        return rows

    def _check_monitor(self) -> None:
        """Fail before rendering anything when the monitor is not a metric this configuration produces."""
        with_class = self.config.render.render_class and bool(self.prompts.class_prompts)
        names = set(self.validator.metric_names(class_images=with_class))  # base images are a row of their own
        if self.config.render.render_base:
            names.add("identity_gain")  # a checkpoint's identity_mean minus the base row's, added by _rank
        monitor, mode = self.config.monitor, self.config.mode
        spec = METRICS.get(monitor)
        if spec is not None and spec.higher_is_better is not None and spec.higher_is_better != (mode == "max"):
            logger.warning("monitor %r is %s-is-better but mode=%r: the winner will have its %s", monitor,
                           "higher" if spec.higher_is_better else "lower", mode,
                           "maximum" if mode == "max" else "minimum")  # fmt: skip
        if self.config.copy_guard is not None and "context_copy_fraction" not in names:
            raise ValueError(
                "SelectionConfig.copy_guard needs the copy signal context_copy_fraction: give the validator "
                "copy_guard= (IdentityValidator(..., copy_guard=0.5)) so that it computes it"
            )
        if self.config.monitor not in names:
            raise ValueError(
                f"monitor {self.config.monitor!r} is not available with these settings (identity_gain needs the base "
                f"model, class_leakage_* class prompts, relative/copy metrics 2 references); "
                f"available: {sorted(names)}"
            )

    # ------------------------------------------------------------------ loading
    @contextlib.contextmanager
    def _loaded(self, checkpoint: RunCheckpoint, timing: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        if checkpoint.kind == "lora":
            self.lora.load(checkpoint.path, checkpoint.files[0].name)
        else:
            denoiser, attr = denoiser_of(self.pipeline)
            if attr != checkpoint.kind:
                raise CheckpointError(
                    f"{checkpoint.path} holds a {checkpoint.kind}/ folder but the pipeline's denoiser is `{attr}`"
                )
            index = next((f for f in checkpoint.files if f.name.endswith(".index.json")), None)
            state = load_safetensors(index or next(f for f in checkpoint.files if f.suffix == ".safetensors"))
            missing, unexpected = denoiser.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"{checkpoint.weights_dir} does not fit the pipeline's {attr}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        timing["load"] = time.perf_counter() - start
        try:
            yield
        finally:
            if checkpoint.kind == "lora" and not self.config.hotswap:
                start = time.perf_counter()
                self.lora.unload()
                timing["load"] += time.perf_counter() - start

    # ------------------------------------------------------------------ scoring
    def _score(self, item: tuple[str, RunCheckpoint | None], fingerprint: str) -> dict[str, Any]:
        name, checkpoint = item
        timing = {"load": 0.0, "render": 0.0, "score": 0.0}
        render_cfg = dataclasses.replace(self.config.render, render_base=False)
        with contextlib.ExitStack() as stack:
            if checkpoint is not None:
                stack.enter_context(self._loaded(checkpoint, timing))
            start = time.perf_counter()
            rendered = render_validation_set(self.pipeline, self.prompts, config=render_cfg)
            timing["render"] = time.perf_counter() - start
        start = time.perf_counter()
        row: dict[str, Any] = dict(self.validator.compute(rendered.images, class_images=rendered.class_images))
        timing["score"] = time.perf_counter() - start
        row.update(name=name, cached=False, fingerprint=fingerprint)
        if checkpoint is not None:
            row.update(step=checkpoint.step, kind=checkpoint.kind, path=str(checkpoint.path))
        row.update({f"time_{k}_s": v for k, v in timing.items()})
        logger.info("scored %s: %s=%.4f (load %.3fs, render %.3fs, score %.3fs)", name, self.config.monitor,
                    row.get(self.config.monitor, float("nan")), timing["load"], timing["render"], timing["score"])
        return row

    def run(self, output_dir: str | os.PathLike[str], *, checkpoints: Sequence[str] | None = None) -> SelectionResult:
        """Select the best checkpoint of the run in ``output_dir`` (see the module docstring).

        Args:
            output_dir: the training run's output folder with ``checkpoint-N`` subfolders.
            checkpoints: only these checkpoint folder names (each must exist).

        Raises:
            CheckpointError: no checkpoints, missing named checkpoints, folders without weights (unless
                ``skip_invalid``), or weights that do not fit the pipeline.
        """
        root = Path(output_dir)
        self._check_monitor()
        if self._is_main:  # what a killed earlier selection left half-written
            remove_stale_temporaries(root)
            if self.config.winner_dir:
                remove_stale_temporaries(Path(self.config.winner_dir).parent)
        entries = find_checkpoints(root, names=checkpoints, skip_invalid=self.config.skip_invalid,
                                   weight_name=self.config.weight_name)
        fingerprint = self.fingerprint()
        cache = self._read_cache(root / SELECTION_JSON, fingerprint) if self.config.use_cache else {}
        hashes = {c.name: content_hash(c) for c in entries}
        work: list[tuple[str, RunCheckpoint | None]] = []
        cached_rows: list[dict[str, Any]] = []
        if self.config.render.render_base:
            if BASE_NAME in cache:
                cached_rows.append({**cache[BASE_NAME], "cached": True})
            else:
                work.append((BASE_NAME, None))  # first item: process 0 renders the base before swapping anything in
        for entry in entries:
            old = cache.get(entry.name)
            if old is not None and old.get("hash") == hashes[entry.name] and old.get("step") == entry.step:
                cached_rows.append({**old, "cached": True, **{k: 0.0 for k in ("time_load_s", "time_render_s",
                                                                                "time_score_s")}})
            else:
                work.append((entry.name, entry))
        logger.info("%d checkpoints (%d cached), %d items to render", len(entries), len(cached_rows), len(work))
        self.lora.prepare_hotswap(c.files[0] for _, c in work if c is not None and c.kind == "lora")
        mine_rows: list[dict[str, Any]] = []
        with self._split(work) as mine:
            logger.info("process %d/%d scores %s", getattr(self.state, "process_index", 0),
                        getattr(self.state, "num_processes", 1), [name for name, _ in mine])
            for item in mine:
                row = self._score(item, fingerprint)
                if item[1] is not None:
                    row["hash"] = hashes[item[0]]
                mine_rows.append(row)
        self.lora.unload()
        all_rows = cached_rows + self._gather(mine_rows)
        result = self._rank(all_rows)
        if self._is_main:
            result.files = self._write(root, result, fingerprint, {c.name: c for c in entries})
        self._wait()
        return result

    # ------------------------------------------------------------------ distribution
    @property
    def _is_main(self) -> bool:
        return bool(getattr(self.state, "is_main_process", True))

    @contextlib.contextmanager
    def _split(self, work: list[Any]) -> Iterator[list[Any]]:
        if self.state is None or getattr(self.state, "num_processes", 1) <= 1:
            yield work
            return
        with self.state.split_between_processes(work) as mine:
            yield list(mine)

    def _gather(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.state is None or getattr(self.state, "num_processes", 1) <= 1:
            return rows
        from accelerate.utils import gather_object

        return list(gather_object(rows))

    def _wait(self) -> None:
        if self.state is not None and getattr(self.state, "num_processes", 1) > 1:
            self.state.wait_for_everyone()

    # ------------------------------------------------------------------ ranking and outputs
    def _rank(self, rows: list[dict[str, Any]]) -> SelectionResult:
        base = next((r for r in rows if r["name"] == BASE_NAME), None)
        ckpts = [dict(r) for r in rows if r["name"] != BASE_NAME]
        for row in ckpts:
            if base is not None and "identity_mean" in base:
                row["identity_gain"] = row["identity_mean"] - base["identity_mean"]
        monitor = self.config.monitor
        missing = [r["name"] for r in ckpts if not isinstance(r.get(monitor), (int, float)) or math.isnan(r[monitor])]
        if missing:
            known = sorted(k for k, v in ckpts[0].items() if isinstance(v, float)) if ckpts else []
            raise ValueError(f"monitor {monitor!r} is not available for {missing}; available metrics: {known}")
        if self.config.copy_guard is None:
            sign = -1.0 if self.config.mode == "max" else 1.0
            ckpts.sort(key=lambda r: (sign * float(r[monitor]), int(r["step"])))
        else:
            ckpts = [ckpts[i] for i in copy_guarded_order(ckpts, monitor=monitor, mode=self.config.mode,
                                                          threshold=self.config.copy_guard)]
            for row in ckpts:
                row["copy_flagged"] = float(row["context_copy_fraction"]) > self.config.copy_guard
        for rank, row in enumerate(ckpts, start=1):
            row["rank"] = rank
        oracle = oracle_std = None
        if self.references.num_references >= 2:
            oracle, oracle_std = self.references.oracle, self.references.oracle_std
        return SelectionResult(ckpts, base, monitor, self.config.mode, oracle, oracle_std)

    def _write(
        self, root: Path, result: SelectionResult, fingerprint: str, entries: dict[str, RunCheckpoint]
    ) -> dict[str, Path]:
        files: dict[str, Path] = {}
        winner_path = None
        if self.config.winner is not None and result.winner is not None:
            winner_path = self._place_winner(root, result, entries[result.winner["name"]])
            files["winner"] = winner_path
        payload = {
            "format": SELECTION_FORMAT,
            "version": 1,
            "library_version": __version__,
            "fingerprint": fingerprint,
            "settings": self.settings(),
            "monitor": result.monitor,
            "mode": result.mode,
            "reference_oracle": result.reference_oracle,
            "reference_oracle_std": result.reference_oracle_std,
            "base": result.base,
            "checkpoints": result.rows,
            "winner": None if result.winner is None else result.winner["name"],
            "winner_path": None if winner_path is None else str(winner_path),
        }
        files["json"] = root / SELECTION_JSON
        write_json_atomic(files["json"], payload)
        files["csv"] = root / SELECTION_CSV
        write_text_atomic(files["csv"], selection_csv(result.rows))
        png = plot_selection(result, root / SELECTION_PNG) if self.config.plot else None
        if png is not None:
            files["png"] = png
        return files

    def _place_winner(self, root: Path, result: SelectionResult, checkpoint: RunCheckpoint) -> Path:
        dest = Path(self.config.winner_dir) if self.config.winner_dir else root / "best_identity"
        summary = {"selected_by": SELECTION_FORMAT, "monitor": result.monitor, "mode": result.mode,
                   "row": result.winner, "source": str(checkpoint.path)}
        if self.config.winner == "symlink":
            tmp = temporary_path(dest)
            target = os.path.relpath(checkpoint.path.resolve(), dest.parent.resolve())
            os.symlink(target, tmp, target_is_directory=True)
            if dest.exists() and not dest.is_symlink():  # a previously copied winner: moved aside, then deleted
                swap_directory(tmp, dest)
            else:
                os.replace(tmp, dest)  # atomically replaces a previous link
            return dest

        def build(tmp: Path) -> None:
            copy_checkpoint_weights(checkpoint, tmp)
            write_json_atomic(tmp / "identity_scores.json", summary)

        return replace_directory(dest, build)


# ---------------------------------------------------------------------------------------------- copy guard
def copy_guarded_order(
    rows: Sequence[dict[str, Any]],
    *,
    monitor: str = "identity_mean",
    mode: Literal["max", "min"] = "max",
    threshold: float = 0.5,
    signal: str = "context_copy_fraction",
) -> list[int]:
    """Rank checkpoints with the copy guard: indices into ``rows``, best first.

    Checkpoints whose ``signal`` is at most ``threshold`` come first, by ``monitor`` (then by step, earlier first);
    the flagged ones follow, least copying first (then by ``monitor``). The winner is therefore the best-scoring
    checkpoint that does not copy, or, when every checkpoint copies, the one that copies least.

    Args:
        rows: one dict of metrics per checkpoint, each with ``monitor`` and ``signal`` (and optionally ``step``).
        monitor, mode: what ranks checkpoints, higher (``"max"``) or lower is better.
        threshold: a checkpoint whose ``signal`` exceeds it is flagged.
        signal: the copy signal's key.

    Example:
        >>> rows = [{"identity_mean": 0.6, "context_copy_fraction": 0.0},
        ...         {"identity_mean": 0.9, "context_copy_fraction": 0.75},   # the best score, but it copies
        ...         {"identity_mean": 0.7, "context_copy_fraction": 0.25}]
        >>> copy_guarded_order(rows, threshold=0.5)
        [2, 0, 1]
    """
    sign = -1.0 if mode == "max" else 1.0
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(monitor), (int, float))
               or not isinstance(r.get(signal), (int, float))]  # fmt: skip
    if missing:
        raise ValueError(f"copy_guarded_order: rows {missing} lack a number for {monitor!r} or {signal!r}")

    def key(i: int) -> tuple[bool, float, float, int]:
        row = rows[i]
        flagged = float(row[signal]) > threshold
        return (flagged, float(row[signal]) if flagged else 0.0, sign * float(row[monitor]), int(row.get("step", i)))

    return sorted(range(len(rows)), key=key)


# ---------------------------------------------------------------------------------------------- helpers
def _partial_state() -> Any:
    try:
        from accelerate import PartialState
    except ImportError:  # selection still works in one process
        return None
    return PartialState()
