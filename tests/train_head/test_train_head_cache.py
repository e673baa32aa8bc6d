"""The feature cache: storage round trip, incremental builds, bad images, and equality with the uncached path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nearid_reward import NearIDModel
from nearid_reward.files import _host_tag
from nearid_reward.preprocess import PixelInputs
from train_head.batching import CachedBatcher, PixelBatcher, TrainCollate, batch_tokens, scatter_embeddings
from train_head.cache import FeatureStore, build_feature_cache, content_key, model_fingerprint
from train_head.data import BadDataReport, NearIDTrainDataset, decode_image, load_folder, load_nearid
from train_head.losses import nearid_loss_terms


def test_store_round_trip_with_variable_lengths(tmp_path):
    store = FeatureStore(tmp_path / "s", shard_size=3)
    (tmp_path / "s").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(5, 6, 4, generator=g)
    store.add([f"k{i}" for i in range(5)], tokens, lengths=[6, 4, 6, 2, 6])  # 3 buffered -> one shard written
    assert len(list((tmp_path / "s").glob("tokens-*.npy"))) == 1
    store.flush()
    fresh = FeatureStore(tmp_path / "s")  # another process sees both shards
    assert len(fresh) == 5 and fresh.keys() == {f"k{i}" for i in range(5)}
    got, mask = fresh.get(["k3", "k0", "k1"])
    assert got.dtype == torch.float16 and got.shape == (3, 6, 4)
    assert mask.tolist() == [[True] * 2 + [False] * 4, [True] * 6, [True] * 4 + [False] * 2]
    torch.testing.assert_close(got[1].float(), tokens[0].half().float())
    torch.testing.assert_close(got[0, :2].float(), tokens[3, :2].half().float())
    assert (got[0, 2:] == 0).all()
    full, no_mask = fresh.get(["k0", "k2"])
    assert no_mask is None and full.shape == (2, 6, 4)
    torch.testing.assert_close(full.float(), tokens[[0, 2]].half().float())
    across, no_mask = fresh.get(["k4", "k0"])  # full-length rows from two shards
    assert no_mask is None
    torch.testing.assert_close(across.float(), tokens[[4, 0]].half().float())
    with pytest.raises(KeyError, match="not in the feature cache"):
        fresh.get(["missing"])


def test_store_ignores_a_shard_without_its_index(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    np.save(folder / "tokens-r000-interrupted.npy", np.zeros((1, 2, 2), np.float16))
    assert len(FeatureStore(folder)) == 0


def test_opening_the_store_removes_shards_of_killed_builds(tmp_path):
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a writer that is gone
    folder = tmp_path / "cache" / ("f" * 24)
    folder.mkdir(parents=True)
    np.save(folder / "tokens-r000-complete.npy", np.zeros((1, 2, 2), np.float16))
    stale = [folder / f".tokens-r000-aaaa.npy.tmp-{_host_tag()}-{child.pid}-0123abcd",
             folder / ".tokens-r000-bbbb.npy.x1y2z3w4.tmp"]  # as named by earlier versions (no pid), an hour old
    live = folder / f".tokens-r001-cccc.npy.tmp-{_host_tag()}-{os.getpid()}-0123abcd"  # a build still running
    for path in [*stale, live]:
        path.write_bytes(b"partial shard")
    os.utime(stale[1], (0, 0))
    FeatureStore.open(tmp_path / "cache", "f" * 32, {}, rank=1)  # only rank 0 cleans
    assert all(p.exists() for p in stale)
    FeatureStore.open(tmp_path / "cache", "f" * 32, {}, rank=0)
    assert not any(p.exists() for p in stale) and live.exists()
    assert (folder / "tokens-r000-complete.npy").exists()


def test_build_is_incremental_and_tokens_match_the_backbone(tmp_path, distractor_dirs, hf_cache, synthetic_dataset,
                                                            tiny_backbone):
    root = synthetic_dataset()
    data = load_nearid(root / "positives", distractor_dirs(root, ("colour",)), cache_dir=hf_cache)
    model = NearIDModel.from_pretrained(tiny_backbone())
    fp = model_fingerprint(model, torch.float32)
    store = FeatureStore.open(tmp_path / "cache", fp, {"note": "test"})
    refs = data.all_refs(data.rows[:6])
    keys = build_feature_cache(store, model, refs, data.registry(), batch_size=5)
    assert set(keys) == set(refs) and len(store) == len(set(keys.values()))
    # a second build over more images encodes only the new ones
    more = data.all_refs(data.rows)
    again = FeatureStore.open(tmp_path / "cache", fp, {"note": "test"})
    before = set(again.keys())
    keys2 = build_feature_cache(again, model, more, data.registry(), batch_size=7)
    assert before <= again.keys() and len(again) == len(set(keys2.values()))
    assert all(keys2[r] == k for r, k in keys.items())
    # the cached tokens are the backbone's final tokens (fp16)
    ref = refs[0]
    raw = data.registry()[ref[0]].read(ref[1], ref[2])
    assert keys[ref] == content_key(raw)
    cached, _ = again.get([keys[ref]])
    with torch.no_grad():
        direct, _ = model.encode_tokens(model.prepare([decode_image(raw)]))
    torch.testing.assert_close(cached.float(), direct.half().float())
    # another backbone never reuses this cache
    other = NearIDModel.from_pretrained(tiny_backbone(image_size=48))
    assert model_fingerprint(other, torch.float32) != fp
    assert model_fingerprint(model, torch.bfloat16) != fp
    clash = tmp_path / "cache" / ("f" * 24)  # a folder whose config names another (longer) fingerprint
    clash.mkdir()
    (clash / "cache_config.json").write_text('{"fingerprint": "%s"}' % ("f" * 32))
    with pytest.raises(ValueError, match="fingerprint"):
        FeatureStore.open(tmp_path / "cache", "f" * 31 + "0", {})


def test_unreadable_images_are_counted_or_raise(tmp_path, tiny_backbone):
    root = tmp_path / "mine"
    for ident in ("a", "b"):
        (root / ident / "distractors").mkdir(parents=True)
        for stem in ("v1", "v2"):
            Image.new("RGB", (32, 32), (100, 50, 20)).save(root / ident / f"{stem}.png")
            Image.new("RGB", (32, 32), (20, 50, 100)).save(root / ident / "distractors" / f"{stem}.png")
    (root / "b" / "v2.png").write_bytes(b"garbage, not a png")
    data = load_folder(root)
    model = NearIDModel.from_pretrained(tiny_backbone())
    store = FeatureStore.open(tmp_path / "cache", model_fingerprint(model, torch.float32), {})
    report = BadDataReport()
    keys = build_feature_cache(store, model, data.all_refs(data.rows), data.registry(), report=report)
    assert report.counts == {"unreadable images": 1}
    assert data.view_ref(1, 1) not in keys and len(keys) == 7
    with pytest.raises(ValueError, match="unreadable images"):
        build_feature_cache(store, model, data.all_refs(data.rows), data.registry(),
                            report=BadDataReport(strict=True))
    # the training collate drops a sample that is left with one readable view (and its distractors)
    ds = NearIDTrainDataset([(data, data.rows)], seed=0)
    batch = TrainCollate(CachedBatcher(store, keys), ds.num_views)([ds[0], ds[1]])
    assert batch["pos_mask"].tolist() == [[True, True], [False, False]]
    assert batch["neg_mask"].tolist() == [[True, True], [False, False]]
    assert len(batch["failed"]) == 1


def _loss(batch, model, num_views):
    tokens, mask = batch_tokens(batch, model, "cpu")
    pooled = F.normalize(model.head(tokens, mask).float(), dim=-1)
    b = batch["batch_size"]
    emb = scatter_embeddings(pooled, batch["slot_index"], b * 2 * num_views).view(b, 2 * num_views, -1)
    return nearid_loss_terms(emb[:, 0], emb[:, 1:num_views], emb[:, num_views:], batch["pos_mask"][:, 1:],
                             batch["neg_mask"]).loss


def test_cached_and_uncached_give_the_same_head_loss(tmp_path, distractor_dirs, hf_cache, synthetic_dataset,
                                                     tiny_backbone):
    root = synthetic_dataset()
    data = load_nearid(root / "positives", distractor_dirs(root), cache_dir=hf_cache)
    model = NearIDModel.from_pretrained(tiny_backbone())
    ds = NearIDTrainDataset([(data, data.rows)], seed=1)
    ds.set_epoch(2)
    items = [ds[i] for i in range(8)]
    store = FeatureStore.open(tmp_path / "cache", model_fingerprint(model, torch.float32), {})
    keys = build_feature_cache(store, model, ds.all_refs(), ds.registry())
    cached = TrainCollate(CachedBatcher(store, keys), 3)(items)
    pixels = TrainCollate(PixelBatcher(ds.registry(), model.preprocess), 3)(items)
    assert torch.equal(cached["slot_index"], pixels["slot_index"])
    assert torch.equal(cached["pos_mask"], pixels["pos_mask"]) and not cached["pos_mask"].all()  # 2-view rows
    loss_c = _loss(cached, model, 3)
    loss_p = _loss(pixels, model, 3)
    assert loss_c.item() == pytest.approx(loss_p.item(), rel=2e-3)  # the cache stores fp16 tokens
    assert loss_c.item() != pytest.approx(_loss(TrainCollate(CachedBatcher(store, keys), 3)(items[::-1][:4]),
                                                model, 3).item(), rel=1e-3)


def test_pixel_inputs_concat_stacks_fixed_size_and_pads_naflex_patches():
    a, b = PixelInputs(torch.rand(2, 3, 8, 8)), PixelInputs(torch.rand(1, 3, 8, 8))
    merged = PixelInputs.concat([a, b])
    assert merged.pixel_attention_mask is None and merged.spatial_shapes is None
    assert torch.equal(merged.pixel_values, torch.cat([a.pixel_values, b.pixel_values]))
    short = PixelInputs(torch.rand(1, 2, 12), torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, 2]]))
    long = PixelInputs(torch.rand(2, 4, 12), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([[2, 2]] * 2))
    merged = PixelInputs.concat([short, long])
    assert merged.pixel_values.shape == (3, 4, 12) and merged.pixel_attention_mask.shape == (3, 4)
    assert torch.equal(merged.pixel_values[0, :2], short.pixel_values[0])
    assert torch.equal(merged.pixel_values[0, 2:], torch.zeros(2, 12))  # padded patches are zeros ...
    assert merged.pixel_attention_mask[0].tolist() == [1, 1, 0, 0]  # ... and masked out
    assert torch.equal(merged.pixel_values[1:], long.pixel_values)
    assert merged.spatial_shapes.tolist() == [[1, 2], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="at least one"):
        PixelInputs.concat([])
    with pytest.raises(ValueError, match="cannot mix NaFlex"):
        PixelInputs.concat([a, short])
