"""The synthetic NearID world: determinism, same-background distractors, level semantics, the CLI, pretraining."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from nearid_reward import NearIDModel
from train_head import synthetic
from train_head.data import decode_image, load_nearid, read_index_file
from train_head.synthetic import (
    LEVELS,
    SyntheticConfig,
    make_distractor,
    render,
    sample_context,
    sample_object,
)
from train_head.synthetic_backbone import BackbonePretrainConfig, pretrain_synthetic_backbone


def _changed_fields(a, b):
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


@pytest.mark.parametrize("seed", range(6))
def test_distractor_levels_change_only_their_attribute(seed):
    obj = sample_object(np.random.default_rng([seed, 1]))
    for level, allowed in (("colour", {"primary"}), ("pattern", {"pattern"}),
                           ("part", {"shape", "part", "part_side"})):
        other = make_distractor(obj, level, np.random.default_rng([seed, 2]))
        changed = _changed_fields(obj, other)
        assert changed and changed <= allowed and (len(changed) == 1)
    with pytest.raises(ValueError, match="level must be one of"):
        make_distractor(obj, "texture", np.random.default_rng(0))


@pytest.mark.parametrize("level", LEVELS)
def test_distractor_shares_the_background_exactly(level):
    rng = np.random.default_rng(3)
    obj, ctx = sample_object(rng), sample_context(rng)
    other = make_distractor(obj, level, np.random.default_rng(4))
    img, body, part = render(obj, ctx, 48, supersample=2, masks=True)
    img2, body2, part2 = render(other, ctx, 48, supersample=2, masks=True)
    outside = (body + part + body2 + part2) == 0
    assert outside.mean() > 0.5
    np.testing.assert_array_equal(img[outside], img2[outside])  # same scene around the object
    assert (np.abs(img.astype(int) - img2.astype(int)).sum(-1) > 30).sum() > 10  # a visible difference
    # another view of the same object is in a different context
    img3 = render(obj, sample_context(np.random.default_rng(5)), 48, supersample=2)
    assert np.abs(img[outside].astype(int) - img3[outside].astype(int)).mean() > 10


def test_generation_is_deterministic_and_written_in_the_nearid_schema(tmp_path, distractor_dirs, hf_cache,
                                                                      synthetic_dataset):
    root = synthetic_dataset()  # seed 0
    assert synthetic.main(["--output_dir", str(tmp_path / "again"), "--num_identities", "16", "--image_size", "32",
                           "--supersample", "2", "--missing_view_rate", "0.25", "--val_fraction", "0.25",
                           "--test_fraction", "0"]) == 0
    other = synthetic.generate_synthetic(tmp_path / "seed1", SyntheticConfig(num_identities=16, image_size=32,
                                                                             supersample=2, seed=1))
    a = load_nearid(root / "positives", distractor_dirs(root), cache_dir=hf_cache)
    b = load_nearid(tmp_path / "again" / "positives", distractor_dirs(tmp_path / "again"), cache_dir=hf_cache)
    c = load_nearid(other / "positives", distractor_dirs(other), cache_dir=hf_cache)
    reg_a, reg_b, reg_c = a.registry(), b.registry(), c.registry()
    for ref_a, ref_b in zip(a.all_refs(a.rows), b.all_refs(b.rows)):
        assert reg_a[ref_a[0]].read(ref_a[1], ref_a[2]) == reg_b[ref_b[0]].read(ref_b[1], ref_b[2])
    ref = c.view_ref(0, 0)
    assert reg_c[ref[0]].read(ref[1], ref[2]) != reg_a[a.view_ref(0, 0)[0]].read(0, "img1")
    assert a.positives.columns[:4] == ["id", "category", "category_description", "n_images"]
    assert a.distractors["colour"].columns == ["id", "category", "n_images", "nimg1", "nimg2", "nimg3"]
    assert decode_image(reg_a[a.view_ref(0, 0)[0]].read(0, "img1")).size == (32, 32)
    assert read_index_file(root / "splits" / "val.json") == read_index_file(tmp_path / "again" / "splits" / "val.json")
    meta = json.loads((root / "synthetic_config.json").read_text())
    assert meta["levels"] == list(LEVELS) and meta["num_identities"] == 16


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="SyntheticConfig.views"):
        SyntheticConfig(views=4)
    with pytest.raises(ValueError, match="SyntheticConfig.levels"):
        SyntheticConfig(levels=("texture",))
    with pytest.raises(SystemExit):
        synthetic.main(["--output_dir", "x", "--image_size", "8"])


def test_pretrained_backbone_is_a_siglip_folder_and_is_reused(tmp_path):
    config = BackbonePretrainConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, num_images=48, num_val_images=16,
                                    steps=6, batch_size=16, warmup_steps=2)
    folder = pretrain_synthetic_backbone(tmp_path / "bb", config)
    stamp = json.loads((folder / "pretrain_config.json").read_text())
    assert set(stamp["held_out_readout"]) == {"shape", "pattern", "part", "side", "scene_mse", "coverage_mse",
                                              "patch_shape", "patch_pattern", "patch_part", "patch_side"}
    model = NearIDModel.from_pretrained(folder)
    assert model.backbone_type == "siglip" and model.preprocess.height == 32
    from transformers import SiglipVisionModel

    reference = SiglipVisionModel.from_pretrained(str(folder))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the frozen baseline is the backbone's own pooled output
        expected = torch.nn.functional.normalize(reference(pixel_values=images * 2 - 1).pooler_output, dim=-1)
        torch.testing.assert_close(model.embed(images), expected, atol=1e-5, rtol=1e-4)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrain_synthetic_backbone(tmp_path / "bb", config) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    pretrain_synthetic_backbone(tmp_path / "bb", dataclasses.replace(config, steps=7))
    assert json.loads((folder / "pretrain_config.json").read_text())["config"]["steps"] == 7
