"""A bare accelerate DreamBooth-LoRA loop with NearID: identity validation, best-adapter keeping, identity reward.

The pieces a custom loop needs: ``NearIDValidationCallback.on_validation(pipeline, step)`` where the loop validates,
``on_checkpoint(output_dir, step)`` after ``accelerator.save_state``, and optionally ``IdentityReward`` as an extra
loss on the one-step x0 of low-noise samples. Run::

    python examples/custom_loop_callback.py --pretrained_model_name_or_path PIPELINE --nearid_model NEARID \\
        --instance_data_dir SUBJECT_PHOTOS --output_dir out/ [--identity_loss_weight 0.1]
"""

# Real (not postponed) annotations: the options dataclass must build even when this file is executed as a module
# that is not in sys.modules (importlib.util.module_from_spec), as the tests load it.
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nearid_reward import IdentityReward, IdentityValidator, NearIDValidationCallback
from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.diffusion import decode_latents, predict_x0
from nearid_reward.files import replace_directory
from nearid_reward.images import to_pil_list, to_rgb
from nearid_reward.pipelines import load_pipeline
from nearid_reward.rendering import PromptSet, RenderConfig


@dataclass
class LoopArguments:
    """The loop's options, one flag per field (diffusers' names)."""

    pretrained_model_name_or_path: str = field(metadata={"help": "the diffusers pipeline to train a LoRA on"})
    nearid_model: str = field(metadata={"help": "NearID checkpoint folder or hub id"})
    instance_data_dir: str = field(metadata={"help": "subject photos: training data and NearID references"})
    instance_prompt: str = field(default="a photo of sks dog", metadata={"help": "the training caption"})
    output_dir: str = field(default="custom-loop-out", metadata={"help": "where the LoRA and checkpoints go"})
    max_train_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    validation_steps: int = field(default=25, metadata={"help": "validate and checkpoint every this many steps"})
    identity_loss_weight: float = field(default=0.0, metadata={"help": "weight of the identity reward loss"})
    resolution: int | None = field(default=None, metadata={"help": "training size (None: the pipeline's)"})
    prompts: str | None = field(
        default=None, metadata={"help": "validation prompt file (None: the shipped identity set)"}
    )
    validation_inference_steps: int = field(default=25, metadata={"help": "sampler steps of validation renders"})


def main(argv: list[str] | None = None) -> NearIDValidationCallback | None:
    (args,) = parse_arguments(LoopArguments, argv, prog="custom_loop_callback.py",
                              description=__doc__.split("\n")[0])

    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = Path(args.output_dir)
    accelerator = Accelerator()
    pipe = load_pipeline(args.pretrained_model_name_or_path).to(accelerator.device)  # safetensors only
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    photos = to_pil_list(args.instance_data_dir)
    pixels = torch.stack([torch.from_numpy(np.asarray(to_rgb(im).resize((size, size)), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1.0 for im in photos]).to(accelerator.device)  # fmt: skip
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([args.instance_prompt] * len(photos), padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids.to(accelerator.device))[0]

    params = [q for q in pipe.unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    reward = IdentityReward(args.nearid_model, photos).to(accelerator.device)  # the photos are the references
    callback = None
    if accelerator.is_main_process:
        validator = IdentityValidator(reward, history_path=out / "identity_history.jsonl", accelerator=accelerator)
        render = RenderConfig(num_inference_steps=args.validation_inference_steps)
        callback = NearIDValidationCallback(validator, output_dir=out, prompts=PromptSet.load(args.prompts),
                                            instance_token="sks", class_noun="dog", render=render)

    def save_lora(models: list[torch.nn.Module], weights: list[dict], folder: str) -> None:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(models[0])))
        type(pipe).save_lora_weights(folder, unet_lora_layers=state)
        weights.pop()

    accelerator.register_save_state_pre_hook(save_lora)
    for step in range(1, args.max_train_steps + 1):
        unet.train()
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds).sample
        loss = F.mse_loss(pred, noise)
        if args.identity_loss_weight > 0:  # ReFL-style: score the one-step x0 of the low-noise samples
            low = t < 400
            if bool(low.any()):
                x0 = predict_x0(pred[low], noisy[low], t[low], noise_scheduler)
                loss = loss + args.identity_loss_weight * reward.loss(decode_latents(pipe.vae, x0)).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step)
        if callback is not None and step % args.validation_steps == 0:
            callback.on_validation(pipe, step)  # renders the identity prompt set (+ base model), scores, keeps best
            # written whole into a temporary folder and renamed: a kill mid-save leaves no half checkpoint-N
            replace_directory(out / f"checkpoint-{step}", lambda tmp: accelerator.save_state(str(tmp)))
            callback.on_checkpoint(out, step)  # writes checkpoint-N/identity_scores.json
    accelerator.end_training()
    return callback


if __name__ == "__main__":
    main()
