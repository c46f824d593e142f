import numpy as np
import pytest

from syndiff_stream.datasets import DatasetError
from syndiff_trainer.data import ArrayDataset, BatchSampler, apply_split, build_augmenter, holdout_split, kfold_splits


def dataset(n=10, size=32):
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), rng.random((n, size, size)) > 0.5,
                        [f"s{i}" for i in range(n)])


def test_splits_are_deterministic_and_disjoint():
    stems = [f"s{i}" for i in range(50)]
    a, b = holdout_split(stems, 0.2, seed=1), holdout_split(list(reversed(stems)), 0.2, seed=1)
    assert a == b and len(a["val"]) == 10 and not set(a["train"]) & set(a["val"])
    folds = kfold_splits(stems, 5, seed=0)
    assert sorted(s for f in folds for s in f["val"]) == sorted(stems)
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and len(f["train"]) + len(f["val"]) == 50


def test_apply_split_refuses_leaks_and_unknown_stems():
    ds = dataset()
    train, val = apply_split(ds, {"train": ["s0", "s1"], "val": ["s2"]})
    assert train.stems == ["s0", "s1"] and np.array_equal(val.images[0], ds.images[2])
    with pytest.raises(DatasetError, match="leaks 1 validation"):
        apply_split(ds, {"train": ["s0", "s1"], "val": ["s1"]})
    with pytest.raises(DatasetError, match="not in the dataset"):
        apply_split(ds, {"train": ["nope"], "val": ["s1"]})


def test_batches_are_seeded_normalised_and_augmented_together():
    ds = dataset()
    x1, y1 = BatchSampler(ds, 4, seed=3).next()
    x2, y2 = BatchSampler(ds, 4, seed=3).next()
    assert x1.shape == (4, 3, 32, 32) and y1.shape == (4, 1, 32, 32)
    assert x1.min() >= -1 and x1.max() <= 1 and set(y1.unique().tolist()) <= {0.0, 1.0}
    assert (x1 == x2).all() and (y1 == y2).all()
    # resuming at step k gives the batch an uninterrupted run would have drawn
    s = BatchSampler(ds, 4, seed=3)
    s.next(), s.next()
    assert (BatchSampler(ds, 4, seed=3, start_step=2).next()[1] == s.next()[1]).all()
    # geometric augmentation moves image and mask together, whatever the draw
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :16] = 255
    for seed in range(8):
        out = build_augmenter("standard", seed=seed)(image=img, mask=(img[..., 0] > 0).astype(np.uint8))
        assert out["image"].shape == (64, 64, 3)
        bright = out["image"].mean(axis=2) > 128
        assert (bright == out["mask"].astype(bool)).mean() > 0.9, f"seed {seed}"
