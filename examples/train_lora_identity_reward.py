"""Fine-tune a LoRA on a diffusers SD / SDXL pipeline to raise NearID identity to a subject's reference photos.

Three modes (``--mode``):

* ``draft`` (DRaFT-K / AlignProp): sample with DDIM and backpropagate the identity reward through the last
  ``--backprop_num_steps`` sampler steps (K=1 is cheap, K=all is full backprop); LoRA-only gradients, optional UNet
  gradient checkpointing (``--gradient_checkpointing``) and random K (``--backprop_strategy random``).
* ``refl`` (ReFL): denoise without gradients to a late random step, take one differentiable step to x0, decode, score.
* ``rwr`` (reward-weighted regression): sample without gradients, score, and train the ordinary diffusion loss on
  the generated images weighted by their normalised reward (no backprop through the sampler).

A prior term keeps the adapter close to a reference on class images (``--class_data_dir``): ``--prior_type kl``
regresses the adapter's prediction onto the reference's, ``--prior_type mse`` is DreamBooth's prior preservation.
The reference is the base model (adapter disabled), or with ``--init_lora`` the starting adapter itself
(``--prior_reference init``, the default then): continuing a DreamBooth LoRA, a KL to the base model pulls the
subject out of the adapter, while a KL to the starting adapter keeps what DreamBooth learned and only limits how far
the reward moves it, as RL fine-tuning keeps its policy near the model it started from. Checkpoints are scored by
:class:`~nearid_reward.NearIDValidationCallback` and the best adapter is kept in ``output_dir/best_identity``. Runs
with ``python`` or ``accelerate launch`` (several GPUs, mixed precision).

Example (SD 1.5, one GPU)::

    accelerate launch examples/train_lora_identity_reward.py \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --nearid_model Aleksandar/nearid-siglip2 \\
        --reference_dir photos/ --instance_token sks --class_noun dog \\
        --mode draft --backprop_num_steps 1 --max_train_steps 500 --output_dir out/

Baseline rewards for comparison, with the same code path: ``--nearid_model`` set to the plain SigLIP backbone
folder scores with the backbone's own (frozen) pooling head, and ``--nearid_pooling mean`` with the mean of its tokens
(CLIP-I / DINO-style).
"""

# Real (not postponed) annotations: the options dataclass must build even when this file is executed as a module
# that is not in sys.modules (importlib.util.module_from_spec), as the tests load it.
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from nearid_reward import IdentityReward, IdentityValidator, NearIDValidationCallback
from nearid_reward.adapters import lora_rank
from nearid_reward.callback import CallbackConfig
from nearid_reward.cli.arguments import parse_arguments, parse_dtype
from nearid_reward.diffusion import (
    SamplerConfig,
    denoising_loss,
    prepare_conditioning,
    refl_images,
    reward_weights,
    sample_images,
)
from nearid_reward.files import append_jsonl, replace_directory
from nearid_reward.images import to_pil_list, to_rgb
from nearid_reward.pipelines import load_pipeline
from nearid_reward.rendering import PromptSet, RenderConfig, adapters_disabled
from nearid_reward.run_checkpoints import LORA_WEIGHT_NAME

logger = logging.getLogger("train_lora_identity_reward")


PROG = "train_lora_identity_reward.py"


@dataclass
class TrainArguments:
    """The script's options, one flag per field (diffusers' names where diffusers has the option)."""

    pretrained_model_name_or_path: str = field(metadata={"help": "the diffusers pipeline to fine-tune"})
    nearid_model: str = field(metadata={"help": "NearID checkpoint folder or hub id"})
    reference_dir: str = field(metadata={"help": "folder of the subject's reference photos"})
    negative_dir: str | None = field(
        default=None, metadata={"help": "near-identity distractors to penalise (optional)"}
    )
    negative_weight: float = field(default=1.0, metadata={"help": "lambda of the near-identity penalty"})
    nearid_pooling: Literal["head", "mean"] = field(
        default="head",
        metadata={"help": "head: the checkpoint's head (NearID; a plain SigLIP folder gives the frozen-head "
                  "baseline); mean: the mean of its backbone tokens (the CLIP-I / DINO-style baseline reward)"},
    )
    instance_token: str = field(default="sks", metadata={"help": "fills {token} in the prompts"})
    class_noun: str = field(default="", metadata={"help": "fills {class} in the prompts"})
    prompts: str | None = field(
        default=None, metadata={"help": "prompt file (None: the shipped identity prompt set)"}
    )
    output_dir: str = field(default="identity-reward-lora", metadata={"help": "where the LoRA and checkpoints go"})
    mode: Literal["draft", "refl", "rwr"] = field(default="draft", metadata={"help": "training mode"})
    backprop_num_steps: int = field(default=1, metadata={"help": "K of DRaFT-K (grad-carrying last steps)"})
    backprop_strategy: Literal["tail", "random"] = field(
        default="tail", metadata={"help": "tail: always the last K steps; random: K drawn in [1, K] each step"}
    )
    refl_range: list[float] = field(
        default_factory=lambda: [0.7, 0.95],
        metadata={"help": "ReFL stops at a random step in this fraction range of the schedule (two numbers)"},
    )
    rwr_temperature: float = field(default=1.0, metadata={"help": "temperature of the reward weights"})
    num_inference_steps: int = field(default=20, metadata={"help": "sampler steps while training"})
    guidance_scale: float = field(default=1.0, metadata={"help": "guidance scale while training"})
    resolution: int | None = field(default=None, metadata={"help": "image size (None: the pipeline's)"})
    train_batch_size: int = field(default=2, metadata={"help": "prompts per step"})
    max_train_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    init_lora: str | None = field(
        default=None,
        metadata={"help": "start from this LoRA (a DreamBooth checkpoint folder or a diffusers LoRA .safetensors "
                  "file); its rank replaces --rank"},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        metadata={"help": "UNet modules that get LoRA (the attention projections, as diffusers' DreamBooth)"},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "UNet gradient checkpointing"})
    class_data_dir: str | None = field(default=None, metadata={"help": "class images for the prior term"})
    prior_type: Literal["kl", "mse"] = field(default="kl", metadata={"help": "kind of prior term"})
    prior_reference: Literal["base", "init"] | None = field(
        default=None,
        metadata={"help": "what the kl prior regresses onto: the base model (adapter disabled) or the --init_lora "
                  "adapter (None: init with --init_lora, else base)"},
    )
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the prior term"})
    checkpointing_steps: int = field(default=100, metadata={"help": "save checkpoint-N every this many steps"})
    validation_steps: int = field(default=100, metadata={"help": "validate every this many steps"})
    validation_inference_steps: int = field(default=20, metadata={"help": "sampler steps of validation renders"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "accelerate precision"})
    report_to: str | None = field(default=None, metadata={"help": "tensorboard, wandb or none"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.backprop_num_steps < 1 or self.backprop_num_steps > self.num_inference_steps:
            raise ValueError(f"--backprop_num_steps must be in [1, --num_inference_steps={self.num_inference_steps}], "
                             f"got {self.backprop_num_steps}")
        if self.prior_reference is None:
            self.prior_reference = "init" if self.init_lora else "base"
        if self.prior_reference == "init" and not self.init_lora:
            raise ValueError("--prior_reference init needs --init_lora (the adapter to stay close to)")
        if len(self.refl_range) != 2 or not 0.0 <= self.refl_range[0] <= self.refl_range[1] < 1.0:
            raise ValueError(f"--refl_range must be two numbers with 0 <= low <= high < 1, got {self.refl_range}")


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    try:
        (args,) = parse_arguments(TrainArguments, argv, prog=PROG, description=__doc__.split("\n")[0])
    except ValueError as exc:  # a bad value: one line, as an argparse error
        raise SystemExit(f"{PROG}: {exc}") from None
    return args


def _class_latents(pipeline: Any, folder: str, size: int, device: torch.device) -> torch.Tensor:
    """VAE latents ``[N, C, h, w]`` of the class images (resized to the training resolution, no gradients)."""
    images = to_pil_list(folder, name="class_data_dir")
    arrays = [np.asarray(to_rgb(img).resize((size, size)), dtype=np.float32) for img in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0  # [N, 3, H, W] in [-1, 1]
    vae = pipeline.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def _read_lora(pipeline: Any, path: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The UNet tensors of a diffusers LoRA (a folder with ``pytorch_lora_weights.safetensors``, or the file), and
    the file they came from."""
    source = Path(path)
    if source.is_dir():
        folder, weight_name = source, LORA_WEIGHT_NAME
    else:
        folder, weight_name = source.parent, source.name
    if not (folder / weight_name).is_file():
        raise FileNotFoundError(f"--init_lora {path}: expected a LoRA .safetensors file or a folder holding "
                                f"{LORA_WEIGHT_NAME}, found no {folder / weight_name}")
    state, _ = type(pipeline).lora_state_dict(str(folder), weight_name=weight_name, use_safetensors=True)
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"--init_lora {path}: the file holds no UNet LoRA tensors (keys starting with 'unet.')")
    return unet_state, folder / weight_name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(args.seed, device_specific=True)
    weight_dtype = parse_dtype(accelerator.mixed_precision, name="--mixed_precision")

    pipeline = load_pipeline(args.pretrained_model_name_or_path)  # safetensors only
    pipeline.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.to(accelerator.device, dtype=weight_dtype if name != "vae" else torch.float32)
    unet = pipeline.unet
    init_state, init_file = _read_lora(pipeline, args.init_lora) if args.init_lora else (None, None)
    rank = lora_rank(init_file) if init_file else args.rank
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(args.lora_target_modules)))
    if init_state and args.prior_reference == "init":  # a frozen copy of the starting adapter: the prior's target
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(args.lora_target_modules)), adapter_name=_REFERENCE)
        set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(init_state), adapter_name=_REFERENCE)
        unet.set_adapter("default")  # trainable again; the reference's tensors are frozen by the switch
    if init_state:
        incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(init_state),
                                                 adapter_name="default")
        unexpected = getattr(incompatible, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"--init_lora {args.init_lora}: {len(unexpected)} tensors do not match this UNet's LoRA "
                             f"layers (--lora_target_modules {args.lora_target_modules}), e.g. {unexpected[0]}")
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for param in lora_params:  # trainable tensors in fp32 under mixed precision
        param.data = param.data.float()
    if args.gradient_checkpointing and args.mode != "draft":  # draft checkpoints each sampler step instead
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate)
    reference_model: Any = (_BaseModel(pipeline) if args.prior_reference == "base"
                            else _StartingAdapter(pipeline, lora_params))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    pipeline.unet = accelerator.unwrap_model(unet)

    # Every rank scores its own samples; the reward model is frozen and shared by nothing else.
    reward = IdentityReward(args.nearid_model, args.reference_dir, negatives=args.negative_dir,
                            negative_weight=args.negative_weight, pooling=args.nearid_pooling).to(accelerator.device)
    prompts = PromptSet.load(args.prompts).fill(args.instance_token, args.class_noun).instance
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    size = args.resolution or int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
    class_latents = (_class_latents(pipeline, args.class_data_dir, size, accelerator.device)
                     if args.class_data_dir and args.prior_loss_weight > 0 else None)
    class_prompts = PromptSet.load(args.prompts).fill("", args.class_noun).instance

    callback = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        validator = IdentityValidator(reward, history_path=out / "identity_history.jsonl", accelerator=accelerator)
        render = RenderConfig(num_inference_steps=args.validation_inference_steps, height=args.resolution,
                              width=args.resolution, render_class=False)
        callback = NearIDValidationCallback(
            validator, output_dir=out, prompts=PromptSet.load(args.prompts),
            config=CallbackConfig(instance_token=args.instance_token, class_noun=args.class_noun, render=render),
        )
        accelerator.init_trackers("identity-reward-lora", config={k: str(v) for k, v in vars(args).items()})

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(model)))
                type(pipeline).save_lora_weights(output_dir, unet_lora_layers=layers)
                weights.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    rng = random.Random(args.seed + accelerator.process_index)
    generator = torch.Generator().manual_seed(args.seed + 1000 * accelerator.process_index)
    history: list[dict[str, float]] = []
    progress = tqdm(range(1, args.max_train_steps + 1), desc="reward fine-tuning",
                    disable=not accelerator.is_local_main_process)
    for step in progress:
        unet.train()
        batch_prompts = [rng.choice(prompts) for _ in range(args.train_batch_size)]
        seeds = [torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
                 for _ in batch_prompts]
        with accelerator.accumulate(unet), accelerator.autocast():
            logs: dict[str, float] = {}
            if args.mode in ("draft", "refl"):
                if args.mode == "draft":
                    k = args.backprop_num_steps if args.backprop_strategy == "tail" else rng.randint(
                        1, args.backprop_num_steps)
                    cfg = SamplerConfig(num_inference_steps=args.num_inference_steps, grad_steps=k,
                                        guidance_scale=args.guidance_scale,
                                        gradient_checkpointing=args.gradient_checkpointing)
                    images = sample_images(pipeline, batch_prompts, config=cfg, height=size, width=size,
                                           generator=seeds)
                else:
                    lo, hi = args.refl_range
                    stop = rng.randint(int(lo * args.num_inference_steps), int(hi * args.num_inference_steps))
                    images = refl_images(pipeline, batch_prompts, stop_index=stop,
                                         num_inference_steps=args.num_inference_steps,
                                         guidance_scale=args.guidance_scale, height=size, width=size,
                                         generator=seeds)
                scores = reward(images)  # [B], differentiable
                loss = (1.0 - scores).mean()
            else:  # reward-weighted regression on the model's own samples
                with torch.no_grad():
                    cfg = SamplerConfig(num_inference_steps=args.num_inference_steps, grad_steps=0,
                                        guidance_scale=args.guidance_scale)
                    images = sample_images(pipeline, batch_prompts, config=cfg, height=size, width=size,
                                           generator=seeds)
                    scores = reward(images)
                    posterior = pipeline.vae.encode(images * 2 - 1).latent_dist
                    latents = posterior.sample() * pipeline.vae.config.scaling_factor
                embeds, _, kwargs = prepare_conditioning(pipeline, batch_prompts, guided=False, height=size,
                                                         width=size)
                per_sample = denoising_loss(unet, noise_scheduler, latents.to(weight_dtype), embeds,
                                            unet_kwargs=kwargs, generator=generator)
                weights = reward_weights(scores, args.rwr_temperature).to(per_sample.device)
                loss = (weights * per_sample).mean()
            if class_latents is not None:
                idx = torch.randint(0, class_latents.shape[0], (args.train_batch_size,), generator=generator)
                cls_prompts = [rng.choice(class_prompts) for _ in range(args.train_batch_size)]
                cls_embeds, _, cls_kwargs = prepare_conditioning(pipeline, cls_prompts, guided=False, height=size,
                                                                 width=size)
                if args.prior_type == "kl":
                    prior = denoising_loss(unet, noise_scheduler, class_latents[idx].to(weight_dtype), cls_embeds,
                                           unet_kwargs=cls_kwargs, target_unet=reference_model,
                                           generator=generator).mean()
                else:
                    prior = denoising_loss(unet, noise_scheduler, class_latents[idx].to(weight_dtype), cls_embeds,
                                           unet_kwargs=cls_kwargs, generator=generator).mean()
                loss = loss + args.prior_loss_weight * prior
                logs["prior_loss"] = float(prior.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        mean_reward = float(accelerator.gather(scores.detach().float()).mean())
        logs.update(loss=float(loss.detach()), reward=mean_reward)
        history.append({"step": step, **logs})
        accelerator.log(logs, step=step)
        progress.set_postfix(reward=f"{mean_reward:.4f}")
        if accelerator.is_main_process:
            append_jsonl(out / "reward_history.jsonl", {"step": step, **logs})
            logger.debug("step %d: reward %.4f loss %.4f", step, mean_reward, logs["loss"])
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            if callback is not None and (step % args.validation_steps == 0 or step == args.max_train_steps):
                unet.eval()
                callback.on_validation(pipeline, step)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                # written whole into a temporary folder and renamed: a kill mid-save leaves no half checkpoint-N
                replace_directory(out / f"checkpoint-{step}", lambda tmp: accelerator.save_state(str(tmp)))
                if callback is not None:
                    callback.on_checkpoint(out, step)
    accelerator.wait_for_everyone()
    result: dict[str, Any] = {"history": history}
    if accelerator.is_main_process:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        type(pipeline).save_lora_weights(str(out), unet_lora_layers=layers)
        if callback is not None:
            result.update(best_step=callback.validator.best_step, best_value=callback.validator.best_value)
            (out / "training_summary.json").write_text(json.dumps(
                {k: v for k, v in result.items() if k != "history"} | {"first_reward": history[0]["reward"],
                                                                       "last_reward": history[-1]["reward"]},
                indent=2))  # fmt: skip
    accelerator.end_training()
    return result


_REFERENCE = "prior_reference"


class _StartingAdapter:
    """Calls the pipeline's UNet with the frozen copy of the starting adapter (the KL prior's target, no gradients)."""

    def __init__(self, pipeline: Any, trainable: list[torch.nn.Parameter]) -> None:
        self.pipeline = pipeline
        self.trainable = trainable

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        unet = self.pipeline.unet
        try:
            unet.set_adapter(_REFERENCE)
            with torch.no_grad():
                return unet(*args, **kwargs)
        finally:
            unet.set_adapter("default")
            for param in self.trainable:  # set_adapter toggles requires_grad; the trained tensors stay trainable
                param.requires_grad_(True)


class _BaseModel:
    """Calls the pipeline's UNet with its adapter disabled (the reference of the KL prior term)."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled(self.pipeline):
            return self.pipeline.unet(*args, **kwargs)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
