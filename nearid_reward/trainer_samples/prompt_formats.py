"""The project's seeded prompt set in each trainer's own sample-prompt format, so sample rounds are comparable.

Identity prompts come first, then class prompts; prompt ``i`` gets seed ``seed + i`` (image ``j`` of it, with several
images per prompt, ``seed + i * images_per_prompt + j``, as :class:`~nearid_reward.RenderConfig` numbers them), so
every round renders the same prompts with the same noise. The formats:

* ``kohya``: an sd-scripts ``--sample_prompts`` text file, one line per image: ``<prompt> --n <negative> --w <W>
  --h <H> --d <seed> --l <cfg> --s <steps>``.
* ``ai-toolkit``: the ``sample:`` block of a job config (YAML): ``prompts``, ``seed`` and ``walk_seed: true`` (the
  seed of prompt ``i`` is ``seed + i``), ``width``, ``height``, ``sample_steps``, ``guidance_scale``, ``neg``.
* ``simpletuner``: a ``--user_prompt_library`` JSON object ``{shortname: prompt}`` (shortnames ``identity_00`` ...,
  ``class_00`` ...); SimpleTuner takes one seed for every prompt from ``--validation_seed``.
* ``onetrainer``: a sample definition JSON list, one object per image with OneTrainer's ``SampleConfig`` field
  names (``enabled``, ``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``, ``random_seed``,
  ``diffusion_steps``, ``cfg_scale``, ``noise_scheduler``).

Example:
    >>> sheet = PromptSheet.from_prompt_set(PromptSet(["a photo of sks dog"], ["a photo of a dog"]), seed=7)
    >>> print(render_prompts(sheet, "kohya", width=512, height=512, steps=20, guidance_scale=None), end="")
    # nearid-prompts: identity prompts 0-0, class prompts from 1 (nearid-samples --class_prompt_start 1)
    a photo of sks dog --w 512 --h 512 --d 7 --s 20
    a photo of a dog --w 512 --h 512 --d 8 --s 20
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from ..rendering import PromptSet

__all__ = ["PROMPT_FORMATS", "PromptFormat", "PromptEntry", "PromptSheet", "render_prompts"]

PromptFormat = Literal["kohya", "ai-toolkit", "simpletuner", "onetrainer"]
PROMPT_FORMATS: tuple[str, ...] = ("kohya", "ai-toolkit", "simpletuner", "onetrainer")


@dataclass(frozen=True)
class PromptEntry:
    """One sample image to render: its prompt, seed, whether it is a class prompt, and a short name."""

    prompt: str
    seed: int
    is_class: bool
    shortname: str


@dataclass(frozen=True)
class PromptSheet:
    """The seeded images of a prompt set, identity prompts first.

    Attributes:
        entries: one per image.
        class_start: index of the first class-prompt image (``len(entries)`` without class prompts): the
            ``--class_prompt_start`` of ``nearid-samples``.
        negative_prompt: the negative prompt of every image, or None.
    """

    entries: tuple[PromptEntry, ...]
    class_start: int
    negative_prompt: str | None = None

    @classmethod
    def from_prompt_set(cls, prompts: PromptSet, *, seed: int, images_per_prompt: int = 1,
                        negative_prompt: str | None = None, with_class: bool = True) -> PromptSheet:
        """Number a filled :class:`~nearid_reward.PromptSet` (no ``{token}``/``{class}`` left) with seeds.

        Raises:
            ValueError: placeholders left, a negative seed or ``images_per_prompt < 1``.
        """
        if prompts.has_placeholders:
            raise ValueError("the prompt set still has {token}/{class} placeholders: give --instance_token and "
                             "--class_noun")
        if seed < 0 or images_per_prompt < 1:
            raise ValueError(f"seed must be >= 0 and images_per_prompt >= 1; got {seed} and {images_per_prompt}")
        entries: list[PromptEntry] = []
        groups = [(False, "identity", prompts.instance)]
        if with_class:
            groups.append((True, "class", prompts.class_prompts))
        for is_class, stem, texts in groups:
            for number, text in enumerate(texts):
                for image in range(images_per_prompt):
                    suffix = f"_{image}" if images_per_prompt > 1 else ""
                    entries.append(PromptEntry(text, seed + len(entries), is_class, f"{stem}_{number:02d}{suffix}"))
        class_start = next((i for i, e in enumerate(entries) if e.is_class), len(entries))
        return cls(tuple(entries), class_start, negative_prompt or None)


def _kohya(sheet: PromptSheet, width: int, height: int, steps: int, guidance_scale: float | None) -> str:
    lines = [f"# nearid-prompts: identity prompts 0-{sheet.class_start - 1}, class prompts from {sheet.class_start} "
             f"(nearid-samples --class_prompt_start {sheet.class_start})"]
    for entry in sheet.entries:
        if " --" in entry.prompt or "\n" in entry.prompt:
            raise ValueError(f"prompt {entry.prompt!r} cannot be written as an sd-scripts prompt line (it holds ' --' "
                             "or a line break)")
        words = [entry.prompt]
        if sheet.negative_prompt:
            words.append(f"--n {sheet.negative_prompt}")
        words += [f"--w {width}", f"--h {height}", f"--d {entry.seed}"]
        if guidance_scale is not None:
            words.append(f"--l {guidance_scale:g}")
        words.append(f"--s {steps}")
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def _yaml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar


def _ai_toolkit(sheet: PromptSheet, width: int, height: int, steps: int, guidance_scale: float | None) -> str:
    first = sheet.entries[0].seed
    lines = [f"# nearid-prompts: paste under the job's process entry; identity prompts 0-{sheet.class_start - 1}, "
             f"class prompts from {sheet.class_start} (nearid-samples --class_prompt_start {sheet.class_start})",
             "sample:", f"  seed: {first}", "  walk_seed: true", f"  width: {width}", f"  height: {height}",
             f"  sample_steps: {steps}"]  # fmt: skip
    if guidance_scale is not None:
        lines.append(f"  guidance_scale: {guidance_scale:g}")
    if sheet.negative_prompt:
        lines.append(f"  neg: {_yaml_string(sheet.negative_prompt)}")
    lines.append("  prompts:")
    lines += [f"    - {_yaml_string(e.prompt)}" for e in sheet.entries]
    return "\n".join(lines) + "\n"


def _simpletuner(sheet: PromptSheet) -> str:
    return json.dumps({e.shortname: e.prompt for e in sheet.entries}, indent=2, ensure_ascii=False) + "\n"


def _onetrainer(sheet: PromptSheet, width: int, height: int, steps: int, guidance_scale: float | None) -> str:
    items = []
    for entry in sheet.entries:
        item: dict[str, object] = {
            "enabled": True, "prompt": entry.prompt, "negative_prompt": sheet.negative_prompt or "",
            "width": width, "height": height, "seed": entry.seed, "random_seed": False, "diffusion_steps": steps,
            "noise_scheduler": "DDIM",
        }  # fmt: skip
        if guidance_scale is not None:
            item["cfg_scale"] = float(guidance_scale)
        items.append(item)
    return json.dumps(items, indent=4, ensure_ascii=False) + "\n"


def render_prompts(sheet: PromptSheet, format: str, *, width: int, height: int, steps: int,
                   guidance_scale: float | None) -> str:
    """The text of ``sheet`` in ``format`` (one of :data:`PROMPT_FORMATS`).

    Args:
        sheet: the seeded images.
        format: ``"kohya"``, ``"ai-toolkit"``, ``"simpletuner"`` or ``"onetrainer"``.
        width, height: image size in pixels (ignored by ``simpletuner``, which takes its validation resolution).
        steps: sampler steps (ignored by ``simpletuner``: ``--validation_num_inference_steps``).
        guidance_scale: classifier-free guidance, or None to leave the trainer's default.

    Raises:
        ValueError: an unknown format, a bad size or step count, or a prompt a format cannot hold.
    """
    if format not in PROMPT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(PROMPT_FORMATS)}; got {format!r}")
    if width < 8 or height < 8 or steps < 1:
        raise ValueError(f"width/height must be >= 8 and steps >= 1; got {width}x{height}, {steps} steps")
    if not sheet.entries:
        raise ValueError("the prompt sheet is empty")
    if format == "kohya":
        return _kohya(sheet, width, height, steps, guidance_scale)
    if format == "ai-toolkit":
        return _ai_toolkit(sheet, width, height, steps, guidance_scale)
    if format == "simpletuner":
        return _simpletuner(sheet)
    return _onetrainer(sheet, width, height, steps, guidance_scale)
