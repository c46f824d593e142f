"""Fixtures for the trainer tests: a small real Kvasir subset, a tiny SDXL inpainting pipeline
and a tiny segmenter, all built locally (no downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
KVASIR = HERE.parents[1].parent / "shared" / "data" / "kvasir-seg-train"
CLINICDB = HERE.parents[1].parent / "shared" / "data" / "cvc-clinicdb-train"
sys.path.insert(0, str(HERE))


def link_kvasir_subset(tmp_path_factory, n: int) -> Path:
    """The first n real Kvasir-SEG pairs, linked (not copied) into a temporary Kvasir-layout folder."""
    if not (KVASIR / "images").is_dir():
        pytest.skip(f"real data not available: {KVASIR} is absent")
    root = tmp_path_factory.mktemp(f"kvasir-subset-{n}")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for image in sorted((KVASIR / "images").glob("*.jpg"))[:n]:
        (root / "images" / image.name).symlink_to(image)
        (root / "masks" / image.name).symlink_to(KVASIR / "masks" / image.name)
    return root


@pytest.fixture(scope="session")
def clinicdb_subset(tmp_path_factory) -> Path:
    """The first 3 whole CVC-ClinicDB sequences, linked, with their sequences.csv rows."""
    if not (CLINICDB / "sequences.csv").is_file():
        pytest.skip(f"real data not available: {CLINICDB} is absent")
    rows = (CLINICDB / "sequences.csv").read_text().splitlines()
    keep = [r for r in rows[1:] if int(r.split(",")[1]) <= 3]
    root = tmp_path_factory.mktemp("clinicdb-subset")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for r in keep:
            name = r.split(",")[0] + ".png"
            (root / sub / name).symlink_to(CLINICDB / sub / name)
    (root / "sequences.csv").write_text("\n".join([rows[0], *keep]) + "\n")
    return root


@pytest.fixture(scope="session")
def kvasir_subset(tmp_path_factory) -> Path:
    return link_kvasir_subset(tmp_path_factory, 8)


@pytest.fixture(scope="session")
def kvasir_40(tmp_path_factory) -> Path:
    return link_kvasir_subset(tmp_path_factory, 40)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from tiny_sdxl import build_tiny_sdxl_inpaint

    return build_tiny_sdxl_inpaint(tmp_path_factory.mktemp("weights") / "tiny-sdxl-inpaint")
