"""NearID schema / folder / manifest / MTG loading, bad-data handling, splits and per-epoch training samples."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_head.data import (
    NearIDTrainDataset,
    decode_image,
    load_data,
    load_folder,
    load_manifest,
    load_mtg,
    load_nearid,
    mtg_oracles,
    read_index_file,
    split_by_identity,
    write_index_file,
)


def _write_table(path: Path, columns: dict, image_columns) -> Path:
    import datasets

    features = {c: (datasets.Image() if c in image_columns else datasets.Value("int64")) for c in columns}
    data = {c: ([None if v is None else {"bytes": v, "path": None} for v in vals] if c in image_columns else vals)
            for c, vals in columns.items()}
    path.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=datasets.Features(features)).to_parquet(str(path / "t.parquet"))
    return path


def _read(data, ref):
    return data.registry()[ref[0]].read(ref[1], ref[2])


def test_load_synthetic_nearid_schema_both_view_prefixes(distractor_dirs, hf_cache, synthetic_dataset):
    for prefix in ("img", "images"):
        root = synthetic_dataset(view_prefix=prefix)
        data = load_nearid(root / "positives", distractor_dirs(root), cache_dir=hf_cache)
        assert data.view_columns == [f"{prefix}1", f"{prefix}2", f"{prefix}3"]
        assert data.settings == ["colour", "pattern", "part"]
        assert len(data) == 16 and data.report.total == 0
        # missing_view_rate leaves some third views empty; their distractors are absent too
        assert not data.view_ok[:, 2].all() and data.view_ok[:, :2].all()
        for s in data.settings:
            np.testing.assert_array_equal(data.distractor_ok[s], data.view_ok)
        assert decode_image(_read(data, data.view_ref(0, 0))).size == (32, 32)


def test_view_prefix_errors_name_the_columns(tmp_path, hf_cache, synthetic_dataset):
    root = synthetic_dataset()
    with pytest.raises(ValueError, match="images1..3"):
        load_nearid(root / "positives", [], view_prefix="images", cache_dir=hf_cache)


def _tiny_tables(tmp_path: Path, ids_neg, n_pos=4, none_view=None):
    png = _png((10, 200, 30))
    pos = {"id": list(range(n_pos)), "img1": [png] * n_pos, "img2": [png] * n_pos, "img3": [png] * n_pos}
    if none_view is not None:
        pos["img2"][none_view] = None
        pos["img3"][none_view] = None
    neg = {"id": list(ids_neg), "nimg1": [png] * len(ids_neg), "nimg2": [png] * len(ids_neg),
           "nimg3": [png] * len(ids_neg)}
    p = _write_table(tmp_path / "pos", pos, ("img1", "img2", "img3"))
    n = _write_table(tmp_path / "NearID-Flux_1024", neg, ("nimg1", "nimg2", "nimg3"))
    return p, n


def _png(colour, size=16):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_mismatched_ids_are_dropped_not_shifted_with_one_warning(tmp_path, caplog, hf_cache):
    p, n = _tiny_tables(tmp_path, ids_neg=[0, 1, 7, 3])
    with caplog.at_level(logging.WARNING, logger="train_head.data"):
        data = load_nearid(p, [n], cache_dir=hf_cache)
        data.report.warn()
        data.report.warn()  # nothing new: no second warning
    assert data.settings == ["flux_1024"]  # folder name without "NearID-", lowercased
    assert data.report.counts == {"mismatched ids": 1}
    assert data.distractor_ok["flux_1024"].all(axis=1).tolist() == [True, True, False, True]
    assert len([r for r in caplog.records if "skipped bad data" in r.message]) == 1
    with pytest.raises(ValueError, match="row 2 has id 7"):
        load_nearid(p, [n], strict=True, cache_dir=hf_cache)


def test_tables_of_different_length(tmp_path, hf_cache):
    p, n = _tiny_tables(tmp_path, ids_neg=[0, 1, 2])
    data = load_nearid(p, [n], cache_dir=hf_cache)
    assert data.report.counts == {"tables of different length": 1}
    assert data.distractor_ok["flux_1024"].all(axis=1).tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="tables of different length"):
        load_nearid(p, [n], strict=True, cache_dir=hf_cache)


def test_identities_with_fewer_than_two_views(tmp_path, hf_cache):
    p, n = _tiny_tables(tmp_path, ids_neg=[0, 1, 2, 3], none_view=1)
    data = load_nearid(p, [n], cache_dir=hf_cache)
    assert data.rows.tolist() == [0, 2, 3]
    assert data.report.counts == {"identities with fewer than 2 views": 1}
    with pytest.raises(ValueError, match=r"row 1 \(id 1\) has 1 view"):
        load_nearid(p, [n], strict=True, cache_dir=hf_cache)


def _folder_tree(root: Path) -> Path:
    for ident, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10)), ("owl", (10, 10, 200))):
        folder = root / ident
        (folder / "distractors").mkdir(parents=True)
        for j, stem in enumerate(("a", "b", "c")):
            Image.new("RGB", (16, 16), tuple(min(255, c + 20 * j) for c in colour)).save(folder / f"{stem}.png")
        for stem in ("a", "c"):
            Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "distractors" / f"{stem}.jpg")
    Image.new("RGB", (16, 16)).save(root / "owl" / "distractors" / "zzz.png")  # matches no view
    return root


def test_folder_format_matches_distractors_by_file_name(tmp_path):
    data = load_folder(_folder_tree(tmp_path / "mine"))
    assert data.ids == ["cat", "dog", "owl"] and data.settings == ["default"]
    assert data.view_columns == ["view1", "view2", "view3"]
    assert data.distractor_ok["default"].tolist() == [[True, False, True]] * 3
    assert data.report.counts == {"distractors without a matching view": 1}
    table = data.distractors["default"]
    assert table.path(0, "nimg3").name == "c.jpg"
    assert load_data(tmp_path / "mine").settings == ["default"]  # auto-detected as the folder format
    with pytest.raises(ValueError, match="zzz"):
        load_folder(tmp_path / "mine", strict=True)


def test_folder_format_several_settings(tmp_path):
    root = _folder_tree(tmp_path / "mine")
    for ident in ("cat", "dog"):
        sub = root / ident / "distractors" / "sdxl"
        sub.mkdir()
        Image.new("RGB", (16, 16)).save(sub / "b.png")
    data = load_folder(root)
    assert data.settings == ["default", "sdxl"]
    assert data.distractor_ok["sdxl"].tolist() == [[False, True, False], [False, True, False], [False] * 3]


def test_manifest(tmp_path):
    root = _folder_tree(tmp_path / "mine")
    lines = [
        {"id": "cat", "views": ["mine/cat/a.png", "mine/cat/b.png"],
         "distractors": ["mine/cat/distractors/a.jpg", None]},
        {"id": "dog", "views": ["mine/dog/a.png", "mine/dog/missing.png"], "distractors": {"x": [None, None]}},
        "not json",
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    data = load_manifest(manifest)
    assert data.ids == ["cat", "dog"] and data.rows.tolist() == [0]  # dog keeps one readable view only
    assert data.report.counts == {"missing image files": 1, "unreadable manifest lines": 1,
                                  "identities with fewer than 2 views": 1}
    assert data.settings == ["default", "x"]
    assert data.distractor_ok["default"][0].tolist() == [True, False]
    assert _read(data, data.view_ref(0, 1)) == (root / "cat" / "b.png").read_bytes()
    with pytest.raises(ValueError, match="missing.png"):
        load_manifest(manifest, strict=True)


def test_splits_by_identity_are_seeded_disjoint_and_saved(tmp_path):
    ids = ["a", "a", "b", "c", "c", "d", "e", "f", "g", "h"]
    s1 = split_by_identity(ids, range(10), val_fraction=0.25, test_fraction=0.25, seed=3)
    assert s1 == split_by_identity(ids, range(10), val_fraction=0.25, test_fraction=0.25, seed=3)
    assert s1 != split_by_identity(ids, range(10), val_fraction=0.25, test_fraction=0.25, seed=4)
    assert sorted(s1["train"] + s1["val"] + s1["test"]) == list(range(10))
    groups = [{ids[r] for r in s1[k]} for k in ("train", "val", "test")]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert {0, 1} <= set(s1["train"]) or {0, 1} <= set(s1["val"]) or {0, 1} <= set(s1["test"])
    write_index_file(tmp_path / "val.json", s1["val"], seed=3)
    assert read_index_file(tmp_path / "val.json") == s1["val"]
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    assert read_index_file(tmp_path / "list.json") == [1, 2, 3]
    (tmp_path / "dup.json").write_text('{"indices": [1, 1]}')
    with pytest.raises(ValueError, match="duplicate"):
        read_index_file(tmp_path / "dup.json")
    with pytest.raises(ValueError, match="outside"):
        read_index_file(tmp_path / "list.json", num_rows=3)


def test_training_samples_deterministic_anchor_shuffle_and_slot_sources(distractor_dirs, hf_cache, synthetic_dataset):
    root = synthetic_dataset()
    data = load_nearid(root / "positives", distractor_dirs(root), cache_dir=hf_cache)
    ds = NearIDTrainDataset([(data, data.rows)], seed=5)
    twin = NearIDTrainDataset([(data, data.rows)], seed=5)
    anchors, sources = set(), set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        twin.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item == twin[i]
            refs = item["refs"]
            views, negs = refs[:3], refs[3:]
            row = views[0][1]
            n_valid = int(data.view_ok[row].sum())
            assert all(v is not None for v in views[:n_valid]) and all(v is None for v in views[n_valid:])
            for v, n in zip(views, negs):  # each distractor shares its view's slot (same background)
                if v is None:
                    assert n is None
                else:
                    assert n is not None and n[1] == row and n[2] == "n" + v[2]
                    sources.add(n[0])
            anchors.add((i, views[0][2]))
    assert len(sources) == 3  # every setting gets drawn
    assert len({a for _, a in anchors}) == 3  # the anchor view changes across epochs
    other = NearIDTrainDataset([(data, data.rows)], seed=6)
    assert [other[i] for i in range(len(ds))] != [NearIDTrainDataset([(data, data.rows)], seed=5)[i]
                                                    for i in range(len(ds))]


def test_mtg_source_and_oracles(distractor_dirs, hf_cache, synthetic_dataset, synthetic_mtg):
    data = load_mtg(synthetic_mtg(), cache_dir=hf_cache)
    assert data.num_views == 2 and data.settings == ["mtg"] and len(data) == 8
    o1, o2 = mtg_oracles(data, data.rows.tolist())
    assert ((o1 > 0) & (o1 < 1)).all() and ((o2 > 0) & (o2 < 1)).all()
    root = synthetic_dataset()
    nearid = load_nearid(root / "positives", distractor_dirs(root, ("colour",)), cache_dir=hf_cache)
    ds = NearIDTrainDataset([(nearid, nearid.rows), (data, data.rows), (data, data.rows)], seed=0)
    assert ds.num_views == 3 and len(ds) == 16 + 2 * 8
    mtg_item = ds[20]
    assert mtg_item["refs"][2] is None and mtg_item["refs"][5] is None  # padded third slot
    # each copy of a repeated source is its own item with its own anchor shuffle
    assert [ds[16 + i]["refs"][0] for i in range(8)] != [ds[24 + i]["refs"][0] for i in range(8)]
    assert {r[0] for r in ds.all_refs()} == {"nearid:positives", "nearid:colour", "mtg:pairs"}


def test_unreadable_bytes_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="unreadable image"):
        decode_image(b"not an image")


def test_folder_missing_root_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no identity folders"):
        load_folder(tmp_path / "empty")
    shutil.rmtree(tmp_path / "empty")


def test_images_are_named_by_their_file_or_by_table_row_and_id(tmp_path):
    import datasets

    from train_head.data import ArrowImageTable, PathImageTable, describe_ref

    ds = datasets.Dataset.from_dict(
        {"id": [7, 8], "img1": [{"bytes": b"not an image", "path": None}, {"bytes": None, "path": "pics/a.png"}]},
        features=datasets.Features({"id": datasets.Value("int64"), "img1": datasets.Image(decode=False)}),
    )
    arrow = ArrowImageTable(ds, "nearid:positives", root=tmp_path)
    files = PathImageTable("folder:positives", {"view1": [tmp_path / "x.png", None]}, ids=["cat", "dog"])
    registry = {"nearid:positives": arrow, "folder:positives": files}
    named = {ref: describe_ref(registry, ref) for ref in [("nearid:positives", 0, "img1"),
                                                          ("folder:positives", 1, "view1")]}
    assert named[("nearid:positives", 0, "img1")] == "table 'nearid:positives' row 0 (id 7) column 'img1'"
    assert describe_ref(registry, ("nearid:positives", 1, "img1")) == str(tmp_path / "pics" / "a.png")
    assert describe_ref(registry, ("folder:positives", 0, "view1")) == str(tmp_path / "x.png")
    assert named[("folder:positives", 1, "view1")] == "table 'folder:positives' row 1 (id 'dog') column 'view1'"
