"""Shared fixtures. Runtime fixtures (tiny model, generated video) are prefixed `rt_`."""

from __future__ import annotations

import os
import socket
from fractions import Fraction

# Inductor (torch.compile on the CPU) imports setuptools for its C++ build; once another test has
# imported the standard library's distutils, setuptools' own-distutils shim refuses to load, and
# every later compile fails. Keeping the standard library's distutils avoids that ordering trap.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")

import numpy as np
import pytest
import torch

from syndiff_stream.model import Segmenter, preset_config

# A segmenter of the compact architecture shrunk to 64-pixel input and a few channels: ~0.1M
# parameters, ~10 ms per frame on one core, so end-to-end tests run real inference quickly.
RT_TINY_CONFIG = dict(image_size=64, vae_block_out_channels=(4, 8, 8), vae_norm_num_groups=4,
                      encoder_block_out_channels=(8, 8), encoder_norm_num_groups=4, cond_channels=4,
                      unet_block_out_channels=(8, 8, 16, 16), unet_norm_num_groups=4, unet_attention_head_dim=8)


def rt_make_tiny_segmenter(seed: int = 0, **overrides) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(preset_config("compact", **{**RT_TINY_CONFIG, **overrides})).eval()


@pytest.fixture
def rt_make_segmenter():
    """rt_make_tiny_segmenter for use inside a test: there the module name `conftest` may already
    belong to tests/trainer's conftest, so a late `from conftest import` gets the wrong one."""
    return rt_make_tiny_segmenter


@pytest.fixture(scope="session")
def rt_tiny_model_dir(tmp_path_factory):
    """Checkpoint folder of a random tiny segmenter (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp("rt_tiny_model")
    rt_make_tiny_segmenter().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def rt_tiny_segmenter(rt_tiny_model_dir):
    return Segmenter.from_pretrained(rt_tiny_model_dir)


def rt_write_video(path, frames: int = 12, size=(120, 160), fps: int = 25, seed: int = 0, codec: str = "mpeg4"):
    """A small video with PyAV: a moving bright disc in a circular field of view on black."""
    import av

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    fov = np.hypot(yy - h / 2, xx - w / 2) < 0.48 * h
    images = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[fov] = (180, 90, 80)
            cx, cy = w / 2 + 20 * np.sin(i / 3), h / 2 + 10 * np.cos(i / 4)
            img[np.hypot(yy - cy, xx - cx) < 12] = (230, 120, 110)
            img = np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8) * fov[..., None]
            images.append(img)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))
    return images


@pytest.fixture
def rt_video(tmp_path):
    path = tmp_path / "clip.mp4"
    rt_write_video(path)
    return path


def rt_free_endpoint() -> str:
    """A loopback TCP endpoint on a port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def rt_endpoint() -> str:
    return rt_free_endpoint()


@pytest.fixture(autouse=True, scope="session")
def rt_isolated_cache(tmp_path_factory):
    """ONNX exports made by tests go to a temporary cache, never to ~/.cache."""
    import os

    old = os.environ.get("SYNDIFF_CACHE")
    os.environ["SYNDIFF_CACHE"] = str(tmp_path_factory.mktemp("rt_cache"))
    yield
    if old is None:
        os.environ.pop("SYNDIFF_CACHE", None)
    else:
        os.environ["SYNDIFF_CACHE"] = old
