"""The sample images each LoRA trainer writes, parsed from their paths alone (pure functions, no file access).

Paths are given relative to the sample folder, with ``/`` separators. The layouts (the trainers' own code was read
for the patterns; see ``docs/trainers.md``):

* ``kohya`` (sd-scripts and the GUIs on it): ``[<output_name>_]{e<epoch:06d>|<step:06d>}_<prompt:02d>_<YYYYmmddHHMMSS>
  [_<seed>].png``. ``<output_name>`` may itself hold ``_`` and ``-``; the seed is there only when the prompt line has
  ``--d``. Epoch rounds (``e000005``) carry no step: :mod:`.checkpoints` resolves it from the epoch checkpoint.
* ``ai-toolkit``: ``<ms since 1970>__<step:09d>_<prompt>.<jpg|png|webp>``; the sample taken after training has no
  step (``<ms>__<prompt>.jpg``) and forms the ``final`` round; distributed sampling prefixes
  ``rank<r>_sample<prompt:03d>_``.
* ``simpletuner``: ``validation_images/step_<step>_<shortname>_<idx>_<W>x<H>.<png|webp|jpg>`` (the shortname may
  hold ``_``) and the base model's ``benchmarks/base_model/<shortname>_<W>x<H>.<ext>``.
* ``onetrainer``: ``<i> - <prompt>[ - no-ema]/[<prefix>]<YYYY-mm-dd_HH-MM-SS>-training-sample-<global_step>-<epoch>-
  <epoch_step>.<ext>``, and ``custom/`` for samples started by hand (variants ``no-ema`` and ``custom``).
* ``diffusers`` (the example DreamBooth scripts): they keep validation images in their trackers only; the images on
  disk are the final validation's ``image_<i>.png`` written beside the model card, the ``final`` round.

Step 0 (and sd-scripts' epoch 0) is the base model (the adapter starts at zero), so it forms the ``base`` round.

Example:
    >>> s = parse_sample_path("my_lora-v2_000500_01_20260102030405_42.png", "kohya")
    >>> s.round, s.prompt_index, s.seed, s.name
    (RoundKey(kind='step', number=500, variant=''), 1, 42, 'my_lora-v2')
    >>> parse_sample_path("1767225600000__000000600_3.jpg", "ai-toolkit").round.label
    'step 600'
    >>> parse_sample_path("validation_images/step_40_my_dog_portrait_0_1024x1024.webp", "simpletuner").prompt
    'my_dog_portrait'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..images import IMAGE_SUFFIXES

__all__ = [
    "TRAINERS",
    "TrainerName",
    "RoundKey",
    "SampleFile",
    "parse_sample_path",
    "detect_trainer",
    "scan_samples",
    "layout_roots",
]

TrainerName = Literal["kohya", "ai-toolkit", "simpletuner", "onetrainer", "diffusers"]
TRAINERS: tuple[str, ...] = ("kohya", "ai-toolkit", "simpletuner", "onetrainer", "diffusers")
RoundKind = Literal["base", "step", "epoch", "final"]

_EXT = r"(?P<ext>png|jpe?g|webp)"
_KOHYA = re.compile(
    r"^(?:(?P<name>.+)_)?(?:e(?P<epoch>\d{6,})|(?P<step>\d{6,}))_(?P<prompt>\d{2,})_(?P<ts>\d{14})"
    r"(?:_(?P<seed>\d+))?\.png$"
)
_AITK = re.compile(
    r"^(?:rank\d+_sample(?P<sample>\d+)_)?(?P<ms>\d+)__(?:(?P<step>\d{9})_)?(?P<count>\d+)\." + _EXT + "$"
)
_SIMPLETUNER = re.compile(r"^step_(?P<step>\d+)_(?P<short>.+)_(?P<idx>\d+)_(?P<w>\d+)x(?P<h>\d+)\." + _EXT + "$")
_SIMPLETUNER_BASE = re.compile(r"^(?P<short>.+)_(?P<w>\d+)x(?P<h>\d+)\." + _EXT + "$")
_ONETRAINER_DIR = re.compile(r"^(?P<i>\d+) - (?P<prompt>.*?)(?P<noema> - no-ema)?$")
_ONETRAINER_FILE = re.compile(
    r"^(?P<prefix>.*?)(?P<ts>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-training-sample-(?P<g>\d+)-(?P<e>\d+)-(?P<es>\d+)\."
    + _EXT + "$"
)  # fmt: skip
_DIFFUSERS_FINAL = re.compile(r"^image_(?P<i>\d+)\.png$")

_KIND_ORDER = {"base": 0, "step": 1, "epoch": 2, "final": 3}


@dataclass(frozen=True)
class RoundKey:
    """One sampling round: the images a trainer rendered from the same weights.

    Attributes:
        kind: ``"base"`` (the model before training), ``"step"``, ``"epoch"`` (sd-scripts' epoch-end samples,
            step unknown from the name) or ``"final"`` (after training, no step in the name).
        number: the step (``step``), the epoch (``epoch``), 0 otherwise.
        variant: ``""``, or OneTrainer's ``"no-ema"`` / ``"custom"`` samples of the same step.
    """

    kind: RoundKind
    number: int = 0
    variant: str = ""

    @property
    def label(self) -> str:
        """``"base"``, ``"step 500"``, ``"epoch 5"``, ``"final"`` (with `` (no-ema)`` for a variant)."""
        text = f"{self.kind} {self.number}" if self.kind in ("step", "epoch") else self.kind
        return f"{text} ({self.variant})" if self.variant else text

    def sort_key(self) -> tuple[int, int, str]:
        """Base first, then steps, epochs and the final round, each in number order."""
        return (_KIND_ORDER[self.kind], self.number, self.variant)


@dataclass(frozen=True)
class SampleFile:
    """One sample image and what its path says.

    Attributes:
        relpath: the path relative to the sample folder, ``/``-separated.
        trainer: the layout that parsed it.
        round: its :class:`RoundKey`.
        prompt: the prompt as the trainer names it: the index (``"03"``), SimpleTuner's shortname, OneTrainer's
            folder, ``"custom"``.
        prompt_index: the prompt's position in the trainer's prompt list, when the path says it.
        image_index: the image's position among the images of that prompt in the round.
        seed: the seed in the name (sd-scripts ``--d``), or None.
        name: sd-scripts' ``--output_name`` prefix, or None.
    """

    relpath: str
    trainer: str
    round: RoundKey
    prompt: str
    prompt_index: int | None = None
    image_index: int = 0
    seed: int | None = None
    name: str | None = None

    def sort_key(self) -> tuple[int, str, int, str]:
        """Order inside a round: prompt, then image, so two rounds with the same prompts pair up one to one."""
        index = self.prompt_index if self.prompt_index is not None else -1
        return (index, self.prompt, self.image_index, self.relpath)


def _step_round(step: int, variant: str = "") -> RoundKey:
    return RoundKey("base", 0, variant) if step == 0 else RoundKey("step", step, variant)


def _kohya(parts: list[str]) -> SampleFile | None:
    if len(parts) != 1:
        return None
    m = _KOHYA.match(parts[0])
    if m is None:
        return None
    if m["epoch"] is not None:
        epoch = int(m["epoch"])
        key = RoundKey("base") if epoch == 0 else RoundKey("epoch", epoch)
    else:
        key = _step_round(int(m["step"]))
    return SampleFile(parts[0], "kohya", key, m["prompt"], int(m["prompt"]), 0,
                      None if m["seed"] is None else int(m["seed"]), m["name"])  # fmt: skip


def _ai_toolkit(parts: list[str]) -> SampleFile | None:
    if len(parts) != 1:
        return None
    m = _AITK.match(parts[0])
    if m is None:
        return None
    index = int(m["sample"]) if m["sample"] is not None else int(m["count"])
    key = RoundKey("final") if m["step"] is None else _step_round(int(m["step"]))
    return SampleFile(parts[0], "ai-toolkit", key, f"{index:02d}", index)


def _simpletuner(parts: list[str]) -> SampleFile | None:
    relpath = "/".join(parts)
    if len(parts) == 3 and parts[:2] == ["benchmarks", "base_model"]:
        m = _SIMPLETUNER_BASE.match(parts[-1])
        if m is None:
            return None
        return SampleFile(relpath, "simpletuner", RoundKey("base"), m["short"])
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "validation_images"):
        return None
    m = _SIMPLETUNER.match(parts[-1])
    if m is None:
        return None
    return SampleFile(relpath, "simpletuner", _step_round(int(m["step"])), m["short"], None, int(m["idx"]))


def _onetrainer(parts: list[str]) -> SampleFile | None:
    if len(parts) == 3 and parts[0] == "samples":
        parts = parts[1:]
    if len(parts) != 2:
        return None
    folder, file = parts
    m = _ONETRAINER_FILE.match(file)
    if m is None:
        return None
    step = int(m["g"])
    relpath = "/".join(parts)
    if folder == "custom":
        return SampleFile(relpath, "onetrainer", _step_round(step, "custom"), "custom")
    d = _ONETRAINER_DIR.match(folder)
    if d is None:
        return None
    variant = "no-ema" if d["noema"] else ""
    return SampleFile(relpath, "onetrainer", _step_round(step, variant), d["prompt"], int(d["i"]))


def _diffusers(parts: list[str]) -> SampleFile | None:
    if len(parts) != 1:
        return None
    m = _DIFFUSERS_FINAL.match(parts[0])
    if m is None:
        return None
    return SampleFile(parts[0], "diffusers", RoundKey("final"), "validation", 0, int(m["i"]))


_PARSERS = {
    "kohya": _kohya,
    "ai-toolkit": _ai_toolkit,
    "simpletuner": _simpletuner,
    "onetrainer": _onetrainer,
    "diffusers": _diffusers,
}


def parse_sample_path(relpath: str, trainer: str) -> SampleFile | None:
    """What the sample path ``relpath`` (relative to the sample folder, ``/``-separated) says, or None when it is
    not one of ``trainer``'s sample images.

    Raises:
        ValueError: ``trainer`` is not one of :data:`TRAINERS`.
    """
    parser = _PARSERS.get(trainer)
    if parser is None:
        raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}; got {trainer!r}")
    parts = [p for p in relpath.replace("\\", "/").split("/") if p]
    if not parts or parts[-1].startswith("."):  # hidden files, our own temporaries
        return None
    return parser(parts)


def _walk(root: Path, depth: int, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    """Relative ``/``-separated paths of the image files under ``root``, at most ``depth`` folders deep, leaving out
    the folders whose relative paths are in ``skip``."""
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    while stack:
        folder, prefix, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if level + 1 < depth and rel not in skip:
                    stack.append((Path(entry.path), rel + "/", level + 1))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                yield rel


_DEPTH = {"kohya": 1, "ai-toolkit": 1, "simpletuner": 3, "onetrainer": 3, "diffusers": 1}


def layout_roots(samples_dir: str | os.PathLike[str], trainer: str) -> Path:
    """The folder sample paths are taken relative to: SimpleTuner's run folder when given its
    ``validation_images/`` (so ``benchmarks/base_model/`` beside it is found), else ``samples_dir`` itself."""
    root = Path(samples_dir)
    if trainer == "simpletuner" and root.name == "validation_images":
        return root.parent
    return root


def scan_samples(samples_dir: str | os.PathLike[str], trainer: str, *, known: set[str] | None = None,
                 skip: Iterable[str | os.PathLike[str]] = ()) -> tuple[list[SampleFile], list[str]]:
    """The sample images of ``trainer`` under ``samples_dir`` and the image files that fit no pattern.

    Args:
        samples_dir: the trainer's sample folder (see :func:`layout_roots`).
        trainer: one of :data:`TRAINERS` (not ``"auto"``: see :func:`detect_trainer`).
        known: relative paths already seen; they are skipped (a watcher lists the folder every poll and parses
            only what is new).
        skip: folders not to look into (e.g. the scorer's own output folder inside a run folder).

    Returns:
        ``(samples, unparsed)``, both sorted by path.
    """
    root = layout_roots(samples_dir, trainer)
    skipped = set()
    for folder in skip:
        try:
            skipped.add(Path(folder).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:  # not under the sample folder
            continue
    samples: list[SampleFile] = []
    unparsed: list[str] = []
    for rel in _walk(root, _DEPTH[trainer], frozenset(skipped)):
        if known is not None and rel in known:
            continue
        parsed = parse_sample_path(rel, trainer)
        if parsed is None:
            unparsed.append(rel)
        else:
            samples.append(parsed)
    samples.sort(key=lambda s: s.relpath)
    return samples, sorted(unparsed)


def detect_trainer(samples_dir: str | os.PathLike[str], *, candidates: Iterable[str] = TRAINERS) -> str:
    """The layout that recognises the most image files under ``samples_dir`` (``--trainer auto``).

    Raises:
        FileNotFoundError: ``samples_dir`` does not exist.
        ValueError: no layout recognises any file, or two recognise the same number (name the trainer then).
    """
    root = Path(samples_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--samples_dir not found: {root}")
    counts = {t: len(scan_samples(root, t)[0]) for t in candidates}
    best = max(counts.values())
    winners = [t for t, n in counts.items() if n == best]
    if best == 0:
        found = sorted(_walk(root, 3))[:5]
        raise ValueError(
            f"--trainer auto: no sample file in {root} matches a known layout ({', '.join(TRAINERS)}); "
            f"first image files found: {found or 'none'}; see docs/trainers.md for the expected names"
        )
    if len(winners) > 1:
        raise ValueError(f"--trainer auto: {root} fits several layouts equally ({', '.join(winners)}): "
                         "give --trainer")
    return winners[0]
