"""One seed, one independent random stream per component of the world model's pretraining.

``nearid-make-world`` takes a single ``--seed``. Each component that draws random numbers gets its own stream,
derived from that seed with numpy's ``SeedSequence`` spawning: component ``i`` of :data:`COMPONENTS` draws from
``SeedSequence(seed).spawn(n)[i]`` (computed directly as ``SeedSequence(seed, spawn_key=(i,))``, which is the same
thing and does not depend on ``n``). A change in one component (how many numbers it draws, or the sizes of the model
it initialises) therefore cannot shift any other component's numbers. Nothing in the pretraining draws from the
global torch or numpy generator: model initialisation runs under a forked torch RNG seeded from its component.

New components are appended to :data:`COMPONENTS`, never inserted, so that the streams of the existing ones keep
their numbers.

Example:
    >>> unet, vae = component_seed(0, "unet_init"), component_seed(0, "vae_init")
    >>> unet == torch_generator(0, "unet_init").initial_seed() and unet != vae
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["COMPONENTS", "component_seed_sequence", "child_seed_sequence", "component_seed", "torch_generator",
           "numpy_generator", "seeded_init"]

COMPONENTS: tuple[str, ...] = (
    "render",  # the rendered training views: identity, context and view of each (one child stream per view)
    "vae_init",  # autoencoder initial weights
    "text_encoder_init",  # CLIP text encoder initial weights
    "unet_init",  # UNet initial weights
    "vae_data",  # autoencoder stage: which views make each batch
    "vae_noise",  # autoencoder stage: samples of the latent posterior
    "denoiser_data",  # denoiser stage: which views make each batch
    "denoiser_noise",  # denoiser stage: latent posterior samples and the diffusion noise
    "denoiser_timesteps",  # denoiser stage: the diffusion timestep of each example
    "caption",  # denoiser stage: which attributes each caption leaves out (caption dropout)
)
"""Every component that draws random numbers, in the fixed order that numbers their streams (append only).

The EMA draws nothing: it starts as a copy of the initial weights and is a deterministic average."""


def component_seed_sequence(seed: int, component: str) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``component``: child :data:`COMPONENTS`.index(component) of ``SeedSequence(seed)``.

    Raises:
        ValueError: ``component`` is not one of :data:`COMPONENTS`, or ``seed`` is negative.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.SeedSequence(int(seed), spawn_key=(COMPONENTS.index(component),))


def child_seed_sequence(seed: int, component: str, index: int) -> np.random.SeedSequence:
    """Child ``index`` of ``component``'s ``SeedSequence`` (``component_seed_sequence(...).spawn(n)[index]``).

    One stream per item (a rendered view), so an item's draws depend on its index only, not on how many come before.
    """
    parent = component_seed_sequence(seed, component)
    return np.random.SeedSequence(parent.entropy, spawn_key=(*parent.spawn_key, int(index)))


def component_seed(seed: int, component: str) -> int:
    """A 63-bit integer seed for ``component`` (for ``torch.Generator.manual_seed``), in [0, 2**63)."""
    words = component_seed_sequence(seed, component).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 32 | int(words[1])) & (2**63 - 1)


def torch_generator(seed: int, component: str) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded for ``component`` (draws are made on the CPU on every device)."""
    return torch.Generator(device="cpu").manual_seed(component_seed(seed, component))


def numpy_generator(seed: int, component: str) -> np.random.Generator:
    """A fresh numpy ``Generator`` (PCG64) seeded from ``component``'s ``SeedSequence``."""
    return np.random.default_rng(component_seed_sequence(seed, component))


@contextmanager
def seeded_init(seed: int, component: str) -> Iterator[None]:
    """Run the block (a model's construction) with the global CPU torch RNG seeded for ``component``.

    The global generator's state before the block is restored after it, so the block neither depends on nor changes
    what the rest of the process draws. Models are built on the CPU (no CUDA generator is touched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield
