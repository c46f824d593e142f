import numpy as np
import pytest
import torch

from syndiff_stream.datasets import DatasetError
from syndiff_trainer.data import (ArrayDataset, BatchSampler, apply_split, build_augmenter, group_kfold,
                                  grouped_split, hash_clusters, manifest_mismatch, read_sequences)


def dataset(n=12, size=32, groups=None, source="a"):
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), rng.random((n, size, size)) > 0.5,
                      [f"s{i}" for i in range(n)], groups or [])
    return ds.prefixed(source)


def two_sources():
    a = dataset(12, groups=[f"g{i // 3}" for i in range(12)], source="a")  # 4 groups of 3
    b = dataset(8, groups=[f"q{i // 4}" for i in range(8)], source="b")  # 2 groups of 4
    return a.concat(b)


def test_grouped_split_keeps_groups_whole_and_takes_a_share_of_every_source():
    ds = two_sources()
    split = grouped_split(ds, 0.25, 0.0, seed=0)
    group = dict(zip(ds.stems, ds.groups))
    val_groups = {group[s] for s in split["val"]}
    assert not val_groups & {group[s] for s in split["train"]}
    assert {g.split("/")[0] for g in val_groups} == {"a", "b"}  # both sources validated
    assert split == grouped_split(ds, 0.25, 0.0, seed=0)
    held = grouped_split(ds, 0.25, 0.0, seed=0, holdout="b")
    assert sorted(held["val"]) == sorted(s for s in ds.stems if s.startswith("b/")) and not held["select"]
    nested = grouped_split(ds, 0.25, 0.25, seed=0)
    assert nested["select"] and not set(nested["select"]) & set(nested["val"])


def test_group_kfold_covers_everything_once_without_splitting_a_group():
    ds = two_sources()
    folds = group_kfold(ds, 2, seed=0)
    assert sorted(s for f in folds for s in f["val"]) == sorted(ds.stems)
    group = dict(zip(ds.stems, ds.groups))
    for f in folds:
        assert not {group[s] for s in f["val"]} & {group[s] for s in f["train"]}


def test_apply_split_refuses_leaks_of_stems_and_of_groups():
    ds = two_sources()
    train, val = apply_split(ds, {"train": ["a/s0", "a/s1", "a/s2"], "val": ["a/s3"]})
    assert train.stems == ["a/s0", "a/s1", "a/s2"] and np.array_equal(val.images[0], ds.images[3])
    with pytest.raises(DatasetError, match="leaks 1 image"):
        apply_split(ds, {"train": ["a/s0", "a/s1"], "val": ["a/s1"]})
    with pytest.raises(DatasetError, match="puts group a/g0 on both train and val"):
        apply_split(ds, {"train": ["a/s0"], "val": ["a/s1"]})
    with pytest.raises(DatasetError, match="not in the dataset"):
        apply_split(ds, {"train": ["nope"], "val": ["a/s3"]})


def test_near_copies_cluster_and_strangers_do_not():
    hashes = np.array([0b0, 0b1, 0b11, 0xFFFF_FFFF_0000_0000, 0xFFFF_FFFF_0000_0001], dtype=np.uint64)
    cluster = hash_clusters(hashes, threshold=1)
    assert cluster[0] == cluster[1] == cluster[2]  # 0-1 and 1-2 are within 1 bit: one component
    assert cluster[3] == cluster[4] != cluster[0]
    assert len(set(hash_clusters(hashes, threshold=0))) == 5


def test_sequences_csv_must_match_the_frames(tmp_path):
    (tmp_path / "sequences.csv").write_text("frame,sequence\n1,1\n2,1\n3,2\n")
    assert read_sequences(tmp_path, ["1", "2", "3"]) == {"1": "seq1", "2": "seq1", "3": "seq2"}
    with pytest.raises(DatasetError, match="names 1 frame.* with no image, e.g. 3"):
        read_sequences(tmp_path, ["1", "2"])
    with pytest.raises(DatasetError, match="does not list 1 frame.*e.g. 4"):
        read_sequences(tmp_path, ["1", "2", "3", "4"])


def test_manifest_mismatch_names_the_file():
    files = [{"stem": "a", "image": "a.jpg", "image_sha256": "1", "mask": "a.png", "mask_sha256": "2"}]
    rec = {"sources": [{"name": "k", "sha256": "x", "files": files}]}
    assert manifest_mismatch(rec, rec) is None
    changed = {"sources": [{"name": "k", "sha256": "y", "files": [{**files[0], "image_sha256": "9"}]}]}
    assert "a.jpg (or its mask) differs" in manifest_mismatch(rec, changed)
    assert "1 recorded file(s) missing, e.g. a.jpg" in manifest_mismatch(rec, {"sources": [{"name": "k", "sha256": "z", "files": []}]})


def test_batches_are_a_pure_function_of_seed_and_step():
    ds = two_sources()
    aug = build_augmenter("scope")
    x1, y1 = BatchSampler(ds, 4, seed=3, augment=aug).batch(7)
    x2, y2 = BatchSampler(ds, 4, seed=3, augment=build_augmenter("scope")).batch(7)
    assert x1.shape == (4, 3, 32, 32) and y1.shape == (4, 1, 32, 32)
    assert x1.min() >= -1 and x1.max() <= 1 and set(y1.unique().tolist()) <= {0.0, 1.0}
    assert (x1 == x2).all() and (y1 == y2).all()
    assert not (BatchSampler(ds, 4, seed=3, augment=aug).batch(8)[0] == x1).all()


def test_the_shares_of_a_global_batch_make_up_the_batch_one_process_draws():
    ds, aug = two_sources(), build_augmenter("scope")
    whole_x, whole_y = BatchSampler(ds, 6, seed=3, augment=aug).batch(7)
    shares = [BatchSampler(ds, 6, seed=3, augment=aug).batch(7, slice(i, i + 2)) for i in (4, 0, 2)]  # any order
    x = {4: shares[0][0], 0: shares[1][0], 2: shares[2][0]}
    assert all(v.shape == (2, 3, 32, 32) for v in x.values())
    assert (torch.cat([x[0], x[2], x[4]]) == whole_x).all()
    assert (torch.cat([shares[1][1], shares[2][1], shares[0][1]]) == whole_y).all()


def test_source_weights_set_how_often_each_source_is_drawn():
    ds = two_sources()  # 12 images of a, 8 of b
    sampler = BatchSampler(ds, 64, seed=0, source_weights={"a": 1.0, "b": 3.0})
    drawn = np.concatenate([sampler.indices(s) for s in range(50)])
    share_b = np.mean([ds.stems[i].startswith("b/") for i in drawn])
    assert 0.7 < share_b < 0.8  # 3 : 1


def test_geometric_augmentation_moves_image_and_mask_together():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :16] = 255
    for seed in range(8):
        out = build_augmenter("standard", seed=seed)(image=img, mask=(img[..., 0] > 0).astype(np.uint8))
        bright = out["image"].mean(axis=2) > 128
        assert (bright == out["mask"].astype(bool)).mean() > 0.9, f"seed {seed}"


def test_scope_field_of_view_clears_the_label_outside_the_view():
    from syndiff_trainer.scope_augment import FieldOfView

    fov = FieldOfView(p=1.0)
    img, mask = np.full((64, 64, 3), 200, np.uint8), np.ones((64, 64), np.uint8)
    for seed in range(6):
        fov.set_random_seed(seed)
        out = fov(image=img, mask=mask)
        dark = out["image"].max(axis=2) == 0
        assert dark.any() and not out["mask"][dark].any() and out["mask"][~dark].all()


def test_channel_mix_keeps_grey_grey_and_moves_colours():
    from syndiff_trainer.scope_augment import ChannelMix

    mix = ChannelMix(sigma=0.3, p=1.0)
    grey = np.full((8, 8, 3), 120, np.uint8)
    reddish = np.zeros((8, 8, 3), np.uint8)
    reddish[..., 0] = 200
    moved = 0
    for seed in range(6):
        mix.set_random_seed(seed)
        out = mix(image=grey)["image"].astype(int)
        assert np.abs(out - 120).max() <= 1  # rows sum to one: grey stays grey
        mix.set_random_seed(seed)
        moved += np.abs(mix(image=reddish)["image"].astype(int) - reddish).max() > 10
    assert moved >= 4


def test_strong_colour_adds_to_any_preset_and_leaves_masks_alone():
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 1
    strong = build_augmenter("none", seed=0, colour="strong")  # colour alone
    assert build_augmenter("none", seed=0) is None
    changed = 0
    for seed in range(8):
        strong.set_random_seed(seed)
        out = strong(image=img, mask=mask)
        assert (out["mask"] == mask).all()
        changed += not (out["image"] == img).all()
    assert 2 <= changed <= 7  # on about half the samples (p = 0.6)
    with pytest.raises(ValueError, match="colour augmentation 'loud'"):
        build_augmenter("standard", colour="loud")


def test_small_polyp_boost_draws_small_polyps_more_often_within_a_source():
    from syndiff_trainer.data import small_polyp_weights
    from syndiff_trainer.recipe import SamplingSpec

    ds = two_sources()
    ds.masks[:] = False
    ds.masks[0, 2:4, 2:4] = True  # a small polyp (4 of 1024 px)
    ds.masks[1, :20, :20] = True  # a large one
    weights = small_polyp_weights(ds, SamplingSpec(small_polyp_boost=3.0))
    assert weights[0] == 4.0 and weights[1] == 1.0 and small_polyp_weights(ds, SamplingSpec()) is None
    sampler = BatchSampler(ds, 64, seed=0, image_weights=weights)
    drawn = np.concatenate([sampler.indices(s) for s in range(40)])
    assert (drawn == 0).sum() > 2.5 * (drawn == 1).sum()
    share_b = np.mean([ds.stems[i].startswith("b/") for i in drawn])
    assert 0.3 < share_b < 0.5  # the source share is untouched (8 of 20 images)
