"""Mask shapes, their placement (inside the field of view, never on an existing polyp), prompts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from syndiff_trainer.placement import (affine_patch, allowed_region, equivalent_diameter, field_of_view_mask,
                                       parametric_shape, place)
from syndiff_trainer.prompts import PromptBank
from syndiff_trainer.synthetic import Planner, SynthConfig


def scope_frame(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """An octagonal scope image on black, with a large polyp filling its left half."""
    frame = np.zeros((size, size, 3), np.uint8)
    c = size // 2
    r = int(size * 0.45)
    octagon = np.array([[c - r // 2, c - r], [c + r // 2, c - r], [c + r, c - r // 2], [c + r, c + r // 2],
                        [c + r // 2, c + r], [c - r // 2, c + r], [c - r, c + r // 2], [c - r, c - r // 2]])
    cv2.fillPoly(frame, [octagon], (180, 90, 80))
    polyp = np.zeros((size, size), bool)
    polyp[c - r // 2:c + r // 2, c - r:c] = True
    frame[polyp] = (200, 120, 110)
    return frame, polyp


@pytest.mark.parametrize("seed", range(20))
def test_place_lands_inside_the_field_of_view_and_off_the_existing_polyp(seed):
    frame, polyp = scope_frame()
    rng = np.random.default_rng(seed)
    shape, _ = parametric_shape(rng, diameter=rng.uniform(4, 30))
    allowed = allowed_region(frame, polyp, margin=2)
    at = place(shape, allowed, rng)
    assert at is not None
    new = np.zeros_like(polyp)
    new[at[0]:at[0] + shape.shape[0], at[1]:at[1] + shape.shape[1]] = shape
    assert not (new & polyp).any()
    assert (new <= field_of_view_mask(frame)).all()
    assert not (new & (frame.max(axis=2) <= 20)).any()  # never on the black border


def test_place_returns_none_when_nothing_fits():
    frame, polyp = scope_frame()
    shape, _ = parametric_shape(np.random.default_rng(0), diameter=100)
    assert place(shape, allowed_region(frame, polyp, margin=2), np.random.default_rng(0)) is None


@pytest.mark.parametrize("diameter", [5.0, 12.0, 40.0])
def test_shapes_have_the_requested_size(diameter):
    rng = np.random.default_rng(1)
    for _ in range(5):
        shape, params = parametric_shape(rng, diameter)
        assert abs(equivalent_diameter(shape) - diameter) <= max(1.5, 0.1 * diameter), params
    donor = np.zeros((200, 200), bool)
    cv2.ellipse(donor.view(np.uint8), (90, 100), (50, 30), 20, 0, 360, 1, -1)
    image = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    mask, patch, params = affine_patch(donor, rng, diameter, image)
    assert abs(equivalent_diameter(mask) - diameter) <= max(1.5, 0.12 * diameter), params
    assert patch.shape[:2] == mask.shape


def test_planned_samples_on_real_frames_respect_fov_and_existing_polyps(kvasir_subset):
    cfg = SynthConfig(data=str(kvasir_subset), out="unused", count=1, method="inpaint", seed=3)
    planner = Planner(cfg, PromptBank.load(), resolution=128)
    kinds = set()
    for index in range(24):
        s = planner.plan(index)
        kinds.add(s.record["mask"]["kind"])
        assert s.new_mask.any() and s.existing.any()  # annotated frames keep their polyp in the label
        assert not (s.new_mask & s.existing).any()
        assert (s.new_mask <= field_of_view_mask(s.frame)).all()
        assert (s.label == (s.new_mask | s.existing)).all()
    assert kinds == {"annotation", "ellipse", "blob"}
    again = planner.plan(5)
    assert (again.new_mask == planner.plan(5).new_mask).all() and again.record == planner.plan(5).record


def test_normal_frames_get_a_polyp_and_a_label_of_just_that_polyp(kvasir_subset, tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"normal{i}.png"), scope_frame()[0] * np.uint8(i + 1) // 3)
    cfg = SynthConfig(data=str(kvasir_subset), out="unused", count=1, normal_frames=str(tmp_path), seed=0)
    planner = Planner(cfg, PromptBank.load(), resolution=64)
    for index in range(6):
        s = planner.plan(index)
        assert s.record["source_kind"] == "normal" and s.record["source_stem"].startswith("normal")
        assert not s.existing.any() and (s.label == s.new_mask).all() and s.new_mask.any()
        assert (s.new_mask <= field_of_view_mask(s.frame)).all()


def test_prompt_bank_covers_paris_classes_sizes_and_surfaces(tmp_path):
    bank = PromptBank.load()
    assert len(bank.prompts) >= 50
    assert {"0-Ip", "0-Is", "0-IIa", "0-IIb", "0-IIc"} <= {p.paris for p in bank.prompts}
    assert {"diminutive", "small", "large"} == {p.size for p in bank.prompts}
    text = " ".join(p.text for p in bank.prompts)
    for word in ("smooth", "irregular", "lobulated", "villous", "fold", "lumen"):
        assert word in text
    assert "smooth healthy tissue, normal colon wall" in bank.negative_prompts
    small = bank.diameter_range(next(p for p in bank.prompts if p.size == "diminutive"))
    large = bank.diameter_range(next(p for p in bank.prompts if p.size == "large"))
    assert small[1] < large[0] + 0.1 and small[0] < large[0]
    custom = tmp_path / "mine.txt"
    custom.write_text("# my prompts\na flat polyp on a fold\n\na pedunculated polyp\n")
    mine = PromptBank.load(custom)
    assert [p.text for p in mine.prompts] == ["a flat polyp on a fold", "a pedunculated polyp"]
    assert mine.sample(np.random.default_rng(0))[1] == "smooth healthy tissue, normal colon wall"
