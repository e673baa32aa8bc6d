"""What NearID validation adds to a DreamBooth script's own validation (``nearid-dreambooth``), per validation.

Reproduce: ``python benchmarks/bench_launcher.py [--steps 25] [--repeats 3]``.

On a tiny SD pipeline with a LoRA adapter (64 px), in one run: the script's own ``log_validation`` (4 images of its
one validation prompt, ``--steps`` DDIM steps; the diffusers default) against what the launcher adds at each
validation with its defaults: the identity prompt set (8 instance prompts) with the adapter, the same seeds with the
adapter disabled (base model), the 4 class prompts (leakage), and NearID scoring of everything. Medians over repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="sampler steps of every validation image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from accelerate import Accelerator

    from nearid_reward import IdentityValidator, NearIDValidationCallback
    from nearid_reward.rendering import PromptSet, RenderConfig, render_validation_set
    from nearid_reward.testing import save_tiny_nearid, write_random_images
    from nearid_reward.testing.pipelines import add_lora_adapter, build_tiny_sd_pipeline

    spec = importlib.util.spec_from_file_location("script", ROOT / "examples" / "dreambooth_lora_minimal.py")
    script = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(script)  # type: ignore[union-attr]
    script.VALIDATION_STEPS = args.steps

    tmp = Path(tempfile.mkdtemp())
    refs = write_random_images(tmp / "refs", 4, 64)
    validator = IdentityValidator(save_tiny_nearid(tmp / "nearid"), refs)
    pipe = build_tiny_sd_pipeline(seed=0)
    add_lora_adapter(pipe.unet, rank=4, seed=1)
    accelerator = Accelerator(cpu=True)
    script_args = SimpleNamespace(seed=0, num_validation_images=4)
    prompts = PromptSet.default().fill("sks", "dog")

    def script_validation() -> None:
        script.log_validation(pipe, script_args, accelerator, {"prompt": "a photo of sks dog"}, 0, torch.float32)

    def render(base: bool, cls: bool) -> None:
        cfg = RenderConfig(num_inference_steps=args.steps, render_base=base, render_class=cls)
        render_validation_set(pipe, prompts, config=cfg)

    rendered = render_validation_set(pipe, prompts, config=RenderConfig(num_inference_steps=args.steps))
    step = iter(range(10**6))

    def score() -> None:
        validator.validate(rendered.images, step=next(step), class_images=rendered.class_images,
                           base_images=rendered.base_images)

    callback = NearIDValidationCallback(validator, prompts=prompts,
                                        render=RenderConfig(num_inference_steps=args.steps))

    def whole() -> None:
        callback.on_validation(pipe, next(step))

    print(environment())
    print(f"tiny SD + LoRA, 64 px, {args.steps} DDIM steps per image, median of {args.repeats} repeats\n")
    rows = [
        ("script's own validation (4 images)", median_time(script_validation, repeats=args.repeats)),
        ("NearID: 8 instance prompts, adapter on", median_time(lambda: render(False, False), repeats=args.repeats)),
        ("NearID: + base model (adapter off)", median_time(lambda: render(True, False), repeats=args.repeats)),
        ("NearID: + 4 class prompts", median_time(lambda: render(True, True), repeats=args.repeats)),
        ("NearID: scoring of all 20 images", median_time(score, repeats=args.repeats)),
        ("NearID: whole validation (callback)", median_time(whole, repeats=args.repeats)),
    ]
    base = rows[0][1]
    print(f"{'what':<42} {'seconds':>9} {'x script':>9}")
    for name, seconds in rows:
        print(f"{name:<42} {seconds:>9.3f} {seconds / base:>9.2f}")


if __name__ == "__main__":
    main()
