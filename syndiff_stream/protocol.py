"""The wire format shared by the publisher and subscribers (documented in docs/protocol.md).

Every message is three ZeroMQ frames: [topic, JSON header, payload]. The header's `schema` is
bumped on any incompatible change; readers reject versions they do not know.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from .frames import Result

SCHEMA_VERSION = 1
TOPIC_MASK, TOPIC_OVERLAY, TOPIC_END = b"mask", b"overlay", b"end"
ENCODINGS = ("raw", "png", "rle")
MAX_POLYPS = 32  # per header, largest first: an untrained model's speckle must not bloat messages


class ProtocolError(ValueError):
    """A message that does not follow the documented schema."""


def encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    """Bool (H, W) -> payload. raw: H*W bytes 0/1, row-major; png: 8-bit grey PNG 0/255;
    rle: little-endian uint32 run lengths of the row-major mask, first run of zeros (may be 0)."""
    if encoding == "raw":
        return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    if encoding == "png":
        ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        return buf.tobytes()
    if encoding == "rle":
        flat = mask.ravel().astype(np.int8)
        edges = np.flatnonzero(np.diff(flat)) + 1
        bounds = np.concatenate([[0], edges, [flat.size]])
        runs = np.diff(bounds)
        if flat.size and flat[0]:
            runs = np.concatenate([[0], runs])
        return runs.astype("<u4").tobytes()
    raise ProtocolError(f"unknown mask encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")


def decode_mask(payload: bytes, encoding: str, shape) -> np.ndarray:
    """Payload -> bool (H, W); inverse of `encode_mask`."""
    h, w = int(shape[0]), int(shape[1])
    if encoding == "raw":
        data = np.frombuffer(payload, np.uint8)
        if data.size != h * w:
            raise ProtocolError(f"raw mask has {data.size} bytes, header shape {h}x{w} needs {h * w}")
        return data.reshape(h, w).astype(bool)
    if encoding == "png":
        data = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)
        if data is None or data.shape != (h, w):
            raise ProtocolError(f"PNG mask does not decode to the header shape {h}x{w}")
        return data > 127
    if encoding == "rle":
        runs = np.frombuffer(payload, "<u4").astype(np.int64)
        if runs.sum() != h * w:
            raise ProtocolError(f"RLE runs cover {runs.sum()} pixels, header shape {h}x{w} needs {h * w}")
        values = np.arange(runs.size) % 2 == 1
        return np.repeat(values, runs).reshape(h, w)
    raise ProtocolError(f"unknown mask encoding {encoding!r}")


def make_header(result: Result, encoding: str) -> dict:
    frame, fov = result.frame, result.fov
    return {
        "schema": SCHEMA_VERSION,
        "source_id": frame.source_id,
        "frame_index": frame.index,
        "pts": frame.pts,
        "capture_time": frame.capture_time,
        "latency_ms": round(result.latency * 1000, 3),
        "shape": [int(frame.image.shape[0]), int(frame.image.shape[1])],
        "encoding": encoding,
        "fov": [fov.x0, fov.y0, fov.x1, fov.y1],
        "polyps_total": len(result.polyps),
        "polyps": [p.as_dict() for p in result.polyps[:MAX_POLYPS]],
    }


def dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def loads(data: bytes) -> dict:
    try:
        header = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("schema") != SCHEMA_VERSION:
        got = header.get("schema") if isinstance(header, dict) else None
        raise ProtocolError(f"schema version {got!r}, this reader understands {SCHEMA_VERSION}")
    return header
