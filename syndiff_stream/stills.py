"""Still images through the stage chain: the library behind `syndiff-stream predict`.

Each image goes through `stages.Stages` on its own (stills are no sequence: the smoother is off
and reset), so the NaN/inf guard and polyp finding are the pipeline's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2

from .atomic import atomic_path
from .backends import Backend
from .datasets import DatasetError, read_image
from .frames import Frame, Result
from .overlay import render_overlay
from .stages import Stages


def write_png(path: Path, image) -> None:
    """Whole file or nothing; OpenCV reports a failed write (full disk, no permission) as False."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"cannot write {path}")


def segment_stills(images: Sequence[Path], backend: Backend, out: Path | None = None
                   ) -> Iterator[tuple[Path, Result | str]]:
    """(path, Result) per image, or (path, reason) for one that cannot be read or written, which is
    skipped. With `out`, writes <stem>_mask.png (0/255) and <stem>_overlay.png there."""
    stages = Stages(backend)
    for index, path in enumerate(map(Path, images)):
        try:
            image = read_image(path)
        except DatasetError as exc:
            yield path, str(exc).removeprefix(f"cannot read image {path}: ")
            continue
        stages.smoother.reset()
        result = stages(Frame(image, path.stem, index, None))
        if out is not None:
            try:
                write_png(out / f"{path.stem}_mask.png", result.mask.astype("uint8") * 255)
                write_png(out / f"{path.stem}_overlay.png", cv2.cvtColor(render_overlay(image, result.mask),
                                                                        cv2.COLOR_RGB2BGR))
            except OSError as exc:
                yield path, f"could not write its output ({exc})"
                continue
        yield path, result
    stages.close()
