"""The clinical prompt bank: what to inpaint, described the way endoscopists report polyps.

The bank is data (`prompts.json`, shipped in the package) so users extend it without code.
Each prompt may carry a size class; the mask drawn for it is sized to match, so "diminutive
3 mm" prompts get small masks (small polyps are the ones screening misses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BANK = Path(__file__).with_name("prompts.json")
DEFAULT_NEGATIVE = "smooth healthy tissue, normal colon wall"
# Equivalent diameter of the mask as a fraction of the frame side, per size class.
DEFAULT_SIZE_CLASSES = {"diminutive": (0.05, 0.11), "small": (0.10, 0.20), "large": (0.18, 0.38)}


@dataclass(frozen=True)
class Prompt:
    text: str
    size: str | None = None  # size class name, or None: any size
    paris: str | None = None


@dataclass(frozen=True)
class PromptBank:
    prompts: tuple[Prompt, ...]
    negative_prompts: tuple[str, ...]
    size_classes: dict

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PromptBank":
        """A JSON bank (the shipped schema) or a text file with one prompt per line (# comments)."""
        path = Path(path) if path is not None else DEFAULT_BANK
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        if path.suffix.lower() != ".json":
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            prompts = tuple(Prompt(ln) for ln in lines if ln and not ln.startswith("#"))
            negatives, sizes = (DEFAULT_NEGATIVE,), DEFAULT_SIZE_CLASSES
        else:
            data = json.loads(path.read_text())
            prompts = tuple(Prompt(p) if isinstance(p, str) else
                            Prompt(p["text"], p.get("size"), p.get("paris")) for p in data.get("prompts", []))
            negatives = tuple(data.get("negative_prompts") or (DEFAULT_NEGATIVE,))
            sizes = {k: tuple(v) for k, v in (data.get("size_classes") or DEFAULT_SIZE_CLASSES).items()}
        if not prompts:
            raise ValueError(f"prompt file {path} holds no prompts")
        unknown = {p.size for p in prompts if p.size is not None} - set(sizes)
        if unknown:
            raise ValueError(f"prompt file {path}: size class(es) {sorted(unknown)} "
                             f"not in size_classes {sorted(sizes)}")
        return cls(prompts, negatives, sizes)

    def sample(self, rng: np.random.Generator) -> tuple[Prompt, str]:
        prompt = self.prompts[rng.integers(len(self.prompts))]
        return prompt, self.negative_prompts[rng.integers(len(self.negative_prompts))]

    def diameter_range(self, prompt: Prompt) -> tuple[float, float]:
        """Mask diameter range (fraction of the frame side) for this prompt's size class."""
        if prompt.size is None:
            return min(v[0] for v in self.size_classes.values()), max(v[1] for v in self.size_classes.values())
        return self.size_classes[prompt.size]
