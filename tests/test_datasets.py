"""Loaders on generated fixtures of every layout the datasets ship in."""

import cv2
import numpy as np
import pytest

from syndiff_stream.datasets import DatasetError, find_pairs, read_image, read_mask


def write_pair(image_path, mask_path, h=40, w=60, ext_mask=None, seed=0):
    rng = np.random.default_rng(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image_path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 20:40] = 255
    cv2.imwrite(str(mask_path), mask)
    return mask > 0


def test_kvasir_layout(tmp_path):
    for i in range(3):
        write_pair(tmp_path / "images" / f"a{i}.jpg", tmp_path / "masks" / f"a{i}.jpg", seed=i)
    pairs = find_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["a0", "a1", "a2"]
    assert read_mask(pairs[0].mask).shape == (40, 60)


def test_cvc_clinicdb_tif_and_png_variants(tmp_path):
    write_pair(tmp_path / "tif" / "Original" / "1.tif", tmp_path / "tif" / "Ground Truth" / "1.tif")
    write_pair(tmp_path / "png" / "PNG" / "Original" / "1.png", tmp_path / "png" / "PNG" / "Ground Truth" / "1.png")
    assert [p.stem for p in find_pairs(tmp_path / "tif")] == ["1"]
    assert [p.image.suffix for p in find_pairs(tmp_path / "png")] == [".png"]


def test_pranet_layout_train_and_named_test_sets(tmp_path):
    write_pair(tmp_path / "TrainDataset" / "image" / "t.png", tmp_path / "TrainDataset" / "mask" / "t.png")
    write_pair(tmp_path / "TestDataset" / "Kvasir" / "images" / "k.png", tmp_path / "TestDataset" / "Kvasir" / "masks" / "k.png")
    assert [p.stem for p in find_pairs(tmp_path)] == ["t"]
    assert [p.stem for p in find_pairs(tmp_path, subset="Kvasir")] == ["k"]
    with pytest.raises(DatasetError, match="no PraNet test set 'CVC-300'.*Kvasir"):
        find_pairs(tmp_path, subset="CVC-300")


def test_paired_folder_with_suffixed_mask_names(tmp_path):
    write_pair(tmp_path / "img" / "x.png", tmp_path / "labels" / "x_mask.png")
    assert [p.stem for p in find_pairs(tmp_path)] == ["x"]


def test_unpaired_files_are_named_or_skipped(tmp_path):
    write_pair(tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a.jpg")
    write_pair(tmp_path / "images" / "lonely.jpg", tmp_path / "masks" / "other.jpg")
    with pytest.raises(DatasetError, match="2 unpaired.*lonely.jpg"):
        find_pairs(tmp_path)
    assert [p.stem for p in find_pairs(tmp_path, skip_unpaired=True)] == ["a"]


def test_jpeg_mask_noise_is_thresholded_at_127(tmp_path):
    mask = cv2.circle(np.zeros((64, 64), np.uint8), (30, 33), 17, 255, -1)
    path = tmp_path / "m.jpg"
    cv2.imwrite(str(path), mask, [cv2.IMWRITE_JPEG_QUALITY, 30])
    noisy = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(noisy)) > 2  # the fixture really is noisy
    assert (read_mask(path) == (mask > 0)).mean() > 0.99


def test_zero_one_label_maps_are_masks_in_one_or_three_channels(tmp_path):
    label = np.zeros((6, 6), np.uint8)
    label[2:4, 1:5] = 1
    cv2.imwrite(str(tmp_path / "one.png"), label)
    cv2.imwrite(str(tmp_path / "three.png"), np.dstack([label] * 3))
    for name in ("one.png", "three.png"):
        assert read_mask(tmp_path / name).sum() == 8, name


def test_grayscale_rgba_and_16bit_files_become_rgb_uint8(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((5, 7), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "a.png"), np.full((5, 7, 4), 100, np.uint8))
    cv2.imwrite(str(tmp_path / "w.png"), np.full((5, 7, 3), 65535, np.uint16))
    for name in ("g.png", "a.png", "w.png"):
        image = read_image(tmp_path / name)
        assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert read_image(tmp_path / "w.png").min() == 255
    rgba_mask = np.zeros((5, 7, 4), np.uint8)
    rgba_mask[1:3, 1:3, :3] = 255
    cv2.imwrite(str(tmp_path / "rm.png"), rgba_mask)
    assert read_mask(tmp_path / "rm.png").sum() == 4


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(DatasetError, match="does not exist"):
        find_pairs(tmp_path / "missing")
