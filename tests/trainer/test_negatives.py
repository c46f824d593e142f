"""Polyp-free data: crops away from the polyp, their groups, their share of the batches, and the
polyp-free frame folders that validation reads."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from syndiff_trainer.data import ArrayDataset, BatchSampler
from syndiff_trainer.negatives import (DECOY_MARK, ERASED_MARK, FREE_MARK, crop_windows, crops_of, decoy_region,
                                       erase_polyps, load_crops, load_polyp_free, parent_stem)


def _frame(h=240, w=320, polyp=(100, 60, 180, 140)):
    """A bright frame with a black border left and right, and a square polyp (x0, y0, x1, y1)."""
    image = np.full((h, w, 3), 150, np.uint8)
    image[:, :20] = image[:, -20:] = 0
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = polyp
    mask[y0:y1, x0:x1] = True
    return image, mask


def test_crop_windows_keep_their_distance_from_every_polyp_pixel():
    image, mask = _frame()
    margin = 0.05
    pad = round(margin * 320)
    grown = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1,) * 2))
    windows = crop_windows(mask, image, 6, np.random.default_rng(0), min_scale=0.3, margin=margin)
    assert len(windows) == 6
    for x0, y0, x1, y1 in windows:
        assert not grown[y0:y1, x0:x1].any()
        assert (image[y0:y1, x0:x1].max(axis=2) >= 20).mean() >= 0.7  # mostly scope image, not border
        # shaped like the field of view (280 x 240), at one of the scales
        assert abs((x1 - x0) / (y1 - y0) - 280 / 240) < 0.05


def test_no_crop_where_the_polyp_fills_the_frame():
    image, mask = _frame(polyp=(20, 0, 300, 240))
    assert crop_windows(mask, image, 3, np.random.default_rng(0)) == []


def test_the_first_crop_is_the_largest_that_fits():
    image, mask = _frame(polyp=(260, 200, 300, 240))  # a small polyp in a corner: room for a large crop
    first, *_ = crop_windows(mask, image, 3, np.random.default_rng(0), margin=0.0)
    assert (first[2] - first[0]) == int(280 * 0.8)


def test_crops_are_cached_named_after_their_frame_and_empty(kvasir_subset, tmp_path):
    crops = load_crops(kvasir_subset, 64, per_image=2, cache_dir=tmp_path, progress=False)
    again = load_crops(kvasir_subset, 64, per_image=2, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*-free-*.npz"))) == 1
    assert again.stems == crops.stems and np.array_equal(again.images, crops.images)
    assert crops.images.shape[1:] == (64, 64, 3) and not crops.masks.any()
    frames = {p.stem for p in (kvasir_subset / "images").iterdir()}
    assert all(FREE_MARK in s and parent_stem(s) in frames for s in crops.stems)
    other_seed = load_crops(kvasir_subset, 64, per_image=2, seed=1, cache_dir=tmp_path, progress=False)
    assert not np.array_equal(other_seed.images, crops.images)


def test_crops_follow_their_frame_into_its_group_and_side():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    frames = ArrayDataset(images, np.zeros((3, 8, 8), bool), ["k/a", "k/b", "k/c"], ["g1", "g1", "g2"])
    crops = ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 8), bool),
                         ["k/a~free0", "k/a~free1", "k/c~free0", "k/z~free0"])
    val = frames.subset([2])
    mine = crops_of(crops, val)
    assert mine.stems == ["k/c~free0"] and mine.groups == ["g2"]
    assert crops_of(crops, frames).groups == ["g1", "g1", "g2"]


def test_batches_draw_polyp_free_crops_at_the_recipe_rate():
    n = 40
    frames = ArrayDataset(np.full((n, 8, 8, 3), 200, np.uint8), np.ones((n, 8, 8), bool),
                          [f"a/{i}" for i in range(n // 2)] + [f"b/{i}" for i in range(n // 2)])
    crops = ArrayDataset(np.zeros((10, 8, 8, 3), np.uint8), np.zeros((10, 8, 8), bool),
                         [f"a/{i}~free0" for i in range(5)] + [f"b/{i}~free0" for i in range(5)])
    sampler = BatchSampler(frames, 64, seed=0, negatives=crops, negative_rate=0.25)
    _, masks = zip(*(sampler.batch(step) for step in range(20)))
    empty = np.mean([not m.any() for batch in masks for m in batch])
    assert 0.2 < empty < 0.3
    assert sampler.rate_at(0) == 0.25 and np.isclose(sampler.p_free[n:].sum(), 1) and np.isclose(sampler.p[:n].sum(), 1)
    without = BatchSampler(frames, 64, seed=0)
    assert np.array_equal(without.indices(3), BatchSampler(frames, 64, seed=0, negatives=crops).indices(3))
    later = BatchSampler(frames, 64, seed=0, negatives=crops, negative_rate=0.25, negatives_from=5, negatives_ramp=4)
    assert all(np.array_equal(later.indices(s), without.indices(s)) for s in range(5))  # frames only, as without
    assert [later.rate_at(s) for s in (4, 5, 6, 8, 20)] == [0.0, 0.0625, 0.125, 0.25, 0.25]
    assert np.array_equal(later.indices(8), sampler.indices(8)) and (later.indices(8) >= n).any()


def test_polyp_free_folder_groups_by_sequence_and_is_cached(tmp_path):
    root = tmp_path / "free"
    (root / "images").mkdir(parents=True)
    for seq, k in [(1, 1), (1, 2), (2, 1)]:
        cv2.imwrite(str(root / "images" / f"seq{seq}_img{k}.jpg"), np.full((48, 64, 3), 90 + k, np.uint8))
    (root / "sequences.csv").write_text("frame,sequence\nseq1_img1,seq1\nseq1_img2,seq1\nseq2_img1,seq2\n")
    ds = load_polyp_free(root, 32, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (3, 32, 32, 3) and not ds.masks.any()
    assert dict(zip(ds.stems, ds.groups)) == {"seq1_img1": "seq1", "seq1_img2": "seq1", "seq2_img1": "seq2"}
    assert load_polyp_free(root, 32, cache_dir=tmp_path / "cache").stems == ds.stems


def test_polyp_free_folder_errors_name_the_folder(tmp_path):
    from syndiff_stream.datasets import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        load_polyp_free(tmp_path / "nowhere", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_polyp_free(tmp_path / "empty", 32)


def test_a_run_with_polyp_free_crops_records_them_and_scores_alarms(kvasir_40, tmp_path):
    from recipes import tiny_recipe

    from syndiff_trainer.train import RunOptions, fit

    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["negatives.rate=0.3", "negatives.per_image=1"])
    fit(recipe, RunOptions(out=str(tmp_path / "run"), progress=False, threads=1, cache_dir=str(tmp_path / "cache")))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["train_polyp_free_crops"] > 0 and run["data"]["val_polyp_free_crops"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("val_alarm" in r for r in rows)
    assert "[negatives]" in (tmp_path / "run" / "recipe.toml").read_text()


@pytest.mark.parametrize("stage1", [True, False])
def test_stage1_draws_empty_masks_only_when_the_recipe_says(kvasir_40, tmp_path, monkeypatch, stage1):
    """negatives.stage1 = false keeps the mask autoencoder on the frames' masks (docs/runs/loco)."""
    from recipes import tiny_recipe

    import syndiff_trainer.train as train

    class Stop(Exception):
        pass

    seen = {}

    def spy(model, frames, val, recipe, device, log, progress, free=None):
        seen["free"] = free
        raise Stop

    monkeypatch.setattr(train, "train_mask_autoencoder", spy)
    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"),
                         sets=["negatives.rate=0.3", "negatives.per_image=1", f"negatives.stage1={str(stage1).lower()}"])
    with pytest.raises(Stop):
        train.fit(recipe, train.RunOptions(out=str(tmp_path / "run"), progress=False, threads=1,
                                           cache_dir=str(tmp_path / "cache")))
    assert (seen["free"] is not None and len(seen["free"]) > 0) == stage1


def _textured(h=96, w=128, polyp=(40, 30, 64, 54), seed=0):
    """Mucosa-like noise with a bright square polyp and a black border on the left."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 160, (h, w, 3), dtype=np.uint8)
    image[:, :10] = 0
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = polyp
    mask[y0:y1, x0:x1] = True
    image[mask] = 250
    return image, mask


def test_an_erased_frame_has_no_polyp_left_and_its_decoy_keeps_the_polyp():
    image, mask = _textured()
    frames = ArrayDataset(image[None], mask[None], ["k/a"], ["g"])
    erased, decoys = erase_polyps(frames, seed=0, margin=0.03)
    assert erased.stems == ["k/a" + ERASED_MARK] and decoys.stems == ["k/a" + DECOY_MARK]
    assert erased.groups == decoys.groups == ["g"]  # a split keeps them on their frame's side
    assert not erased.masks.any() and np.array_equal(decoys.masks[0], mask)
    assert erased.images[0][mask].mean() < 200  # the bright polyp is filled in from the mucosa around it
    assert np.array_equal(erased.images[0][~mask & (image.max(2) > 0)][:50], image[~mask & (image.max(2) > 0)][:50])
    assert np.array_equal(decoys.images[0][mask], image[mask])  # the decoy's polyp is untouched ...
    changed = (decoys.images[0] != image).any(2)
    assert changed.any() and not (changed & mask).any()  # ... and its fill lies elsewhere


def test_a_decoy_keeps_away_from_the_polyp_and_the_border():
    image, mask = _textured()
    pad = 3
    for seed in range(20):
        region = decoy_region(mask, image, np.random.default_rng(seed), pad)
        assert region is not None and region.sum() >= mask.sum()
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * pad + 1, 2 * pad + 1), np.uint8)) > 0
        assert not (region & grown).any()
        assert (image.max(2)[region] > 0).mean() >= 0.7


def test_frames_whose_polyp_is_too_large_or_leaves_no_room_give_neither():
    big, big_mask = _textured(polyp=(10, 0, 128, 96))  # the polyp fills the scope image
    small, small_mask = _textured()
    frames = ArrayDataset(np.stack([big, small]), np.stack([big_mask, small_mask]), ["k/big", "k/small"])
    erased, decoys = erase_polyps(frames)
    assert erased.stems == ["k/small" + ERASED_MARK] and len(decoys) == 1
    none = erase_polyps(frames.subset([0]))
    assert len(none[0]) == len(none[1]) == 0 and none[0].images.shape[1:] == (96, 128, 3)


def test_a_run_with_erased_frames_draws_them_and_their_decoys(kvasir_40, tmp_path):
    from recipes import tiny_recipe

    from syndiff_trainer.train import RunOptions, fit

    recipe = tiny_recipe(("kvasir", kvasir_40, "phash"),
                         sets=["negatives.rate=0.3", "negatives.per_image=1", "negatives.erased=true"])
    fit(recipe, RunOptions(out=str(tmp_path / "run"), progress=False, threads=1, cache_dir=str(tmp_path / "cache")))
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    plain = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=["negatives.rate=0.3", "negatives.per_image=1"])
    fit(plain, RunOptions(out=str(tmp_path / "plain"), progress=False, threads=1, cache_dir=str(tmp_path / "cache")))
    before = json.loads((tmp_path / "plain" / "run.json").read_text())["data"]
    decoys = data["train"] - before["train"]
    assert decoys > 0 and data["train_polyp_free_crops"] - before["train_polyp_free_crops"] == decoys
    assert data["val"] == before["val"] and data["val_polyp_free_crops"] == before["val_polyp_free_crops"]


def test_a_presence_run_reuses_another_runs_stage1_and_learns_from_polyp_free_draws(kvasir_40, tmp_path):
    """The polyp-free draws reach the presence head; a copied mask_ae/ from a run without a head
    skips stage 1 and leaves its autoencoder in the new checkpoint bit for bit."""
    import shutil

    import torch
    from recipes import tiny_recipe

    from syndiff_stream.model import Segmenter
    from syndiff_trainer.train import RunOptions, fit

    sets = ["negatives.rate=0.5", "negatives.per_image=1", "negatives.erased=true", "steps=6"]
    plain = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=sets)
    fit(plain, RunOptions(out=str(tmp_path / "plain"), progress=False, threads=1, cache_dir=str(tmp_path / "cache")))
    shutil.copytree(tmp_path / "plain" / "mask_ae", tmp_path / "head" / "mask_ae")
    head = tiny_recipe(("kvasir", kvasir_40, "phash"), sets=[*sets, "model.overrides.presence_head=true"])
    fit(head, RunOptions(out=str(tmp_path / "head"), progress=False, threads=1, cache_dir=str(tmp_path / "cache")))
    rows = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == 1 for r in plain_rows) and not any(r.get("stage") == 1 for r in rows)
    assert any("presence" in r for r in rows)
    model, ae = Segmenter.from_pretrained(tmp_path / "head" / "model"), Segmenter.from_pretrained(tmp_path / "plain" / "mask_ae")
    assert model.presence is not None and ae.presence is None
    assert all(torch.equal(v, ae.mask_vae.state_dict()[k]) for k, v in model.mask_vae.state_dict().items())
    assert model.config.latent_scaling_factor == ae.config.latent_scaling_factor != 1.0  # stage 1 measured it
