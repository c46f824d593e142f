"""The processes one run trains on: one (`syndiff-train fit` by itself) or several started by
`accelerate launch` (or torchrun), one per GPU, data-parallel (DDP; gloo on CPU).

The recipe's `batch_size` is the global batch. Each process draws only its own slots of it,
`grad_accum` micro-batches of batch_size / (processes x grad_accum), and the union over processes
and micro-batches is the batch one process would draw: batches, augmentation and noise are pure
functions of (seed, step, slot). DDP averages the gradients, so a step is the same step whatever
the layout, up to the order of float sums. Only the main process writes (records, log,
checkpoints, state).

A single process never imports accelerate and runs exactly as it always did.
"""

from __future__ import annotations

import contextlib
import os

import torch

from syndiff_stream.backends import pick_device

from .recipe import RecipeError


def launched() -> bool:
    """Started as one of several processes (accelerate launch, torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class World:
    """Rank, size and device of this process, and the few collective steps training needs."""

    def __init__(self, device: torch.device, accelerator=None):
        self.device, self.accelerator = device, accelerator
        self.size = accelerator.num_processes if accelerator else 1
        self.rank = accelerator.process_index if accelerator else 0
        self.is_main = self.rank == 0

    @classmethod
    def start(cls, device: str = "auto") -> "World":
        """This process's place: alone on `device`, or under a launcher, on the device it assigns."""
        if not launched():
            return cls(torch.device(pick_device(device)))
        if device not in ("auto", "cpu", "cuda"):
            raise RecipeError(f"--device {device}: under accelerate launch each process gets its GPU from the "
                              "launcher; use auto, cuda or cpu")
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if precision == "fp16":
            raise RecipeError("accelerate launch --mixed_precision fp16: not supported (no loss scaling here); "
                              "use bf16 (the default on GPU) or --precision no")
        try:
            from accelerate import Accelerator
        except ImportError:
            raise RecipeError("training on several processes needs accelerate: pip install accelerate") from None
        # Mixed precision is fit's own autocast (the same as in one process), so accelerate adds none.
        accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available(), mixed_precision="no")
        return cls(accelerator.device, accelerator)

    def micro_batches(self, batch_size: int, grad_accum: int) -> tuple[slice, list[slice]]:
        """(this process's slots of the global batch, those slots split into `grad_accum`
        micro-batches, relative to the first): a one-line error unless the batch divides evenly."""
        parts = self.size * grad_accum
        if batch_size % parts:
            raise RecipeError(f"batch_size {batch_size} (the global batch) does not divide into {self.size} "
                              f"process(es) x {grad_accum} accumulation step(s); make it a multiple of {parts}")
        per = batch_size // parts
        mine = slice(self.rank * grad_accum * per, (self.rank + 1) * grad_accum * per)
        return mine, [slice(k * per, (k + 1) * per) for k in range(grad_accum)]

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP across the processes (gradients averaged in backward); alone: the module itself."""
        return self.accelerator.prepare_model(module) if self.accelerator else module

    def no_sync(self, module: torch.nn.Module, skip: bool):
        """Accumulate gradients locally (no all-reduce) for every micro-batch but the last."""
        if self.accelerator and skip:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self):
        """The main process does the block (reads data, writes the records) before the others."""
        if not self.accelerator:
            yield
            return
        with self.accelerator.main_process_first():
            yield

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value averaged over the processes (what the log reports); alone: as they are."""
        if not self.accelerator:
            return values
        keys = sorted(values)
        stacked = self.accelerator.reduce(torch.stack([values[k].detach().float() for k in keys]), "mean")
        return dict(zip(keys, stacked))
