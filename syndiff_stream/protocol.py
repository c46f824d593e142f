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
TOPIC_MASK, TOPIC_OVERLAY, TOPIC_END, TOPIC_STATUS = b"mask", b"overlay", b"end", b"status"
ENCODINGS = ("raw", "png", "rle")
MAX_POLYPS = 32  # per header, largest first: an untrained model's speckle must not bloat messages
MAX_PIXELS = 1 << 26  # 8K is 33 Mpx: a header asking for more is hostile or broken, not a frame


PNG_OPTIONS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
               cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


class ProtocolError(ValueError):
    """A message that does not follow the documented schema."""


def encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    """Bool (H, W) -> payload. raw: H*W bytes 0/1, row-major; png: 8-bit grey PNG 0/255;
    rle: little-endian uint32 run lengths of the row-major mask, first run of zeros (may be 0)."""
    if encoding == "raw":
        return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    if encoding == "png":
        # No row filter and zlib's run-length strategy: a 0/255 mask gains nothing from PNG's
        # adaptive filters, which took three quarters of the encoding time (6.0 -> 1.5 ms at
        # 720x576), and the runs make it a third of the size. Still an 8-bit grey PNG.
        grey = (mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)) * np.uint8(255)
        ok, buf = cv2.imencode(".png", grey, PNG_OPTIONS)
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


def check_shape(shape) -> tuple[int, int]:
    """A header's `shape` as (H, W), refused unless two positive ints within MAX_PIXELS."""
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ProtocolError(f"header shape {shape!r} is not [height, width]")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise ProtocolError(f"header shape {shape[0]}x{shape[1]} exceeds {MAX_PIXELS} pixels")
    return int(shape[0]), int(shape[1])


def image_size(payload: bytes) -> tuple[int, int] | None:
    """(H, W) from a PNG's IHDR or a JPEG's start-of-frame, read before decoding so a small
    payload cannot make the decoder allocate a huge image; None when neither is found."""
    if payload[:8] == b"\x89PNG\r\n\x1a\n" and payload[12:16] == b"IHDR":
        return int.from_bytes(payload[20:24], "big"), int.from_bytes(payload[16:20], "big")
    i = 2 if payload[:2] == b"\xff\xd8" else len(payload)
    while i + 9 <= len(payload) and payload[i] == 0xFF:
        marker, length = payload[i + 1], int.from_bytes(payload[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(payload[i + 5:i + 7], "big"), int.from_bytes(payload[i + 7:i + 9], "big")
        i += 2 + length
    return None


def decode_image(payload: bytes, shape, flags: int) -> np.ndarray:
    """PNG/JPEG payload -> array, only when its own size matches the header's `shape`."""
    if image_size(payload) != tuple(shape):
        raise ProtocolError(f"image payload is not a PNG/JPEG of the header shape {shape[0]}x{shape[1]}")
    data = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
    if data is None or data.shape[:2] != tuple(shape):
        raise ProtocolError(f"image payload does not decode to the header shape {shape[0]}x{shape[1]}")
    return data


def decode_mask(payload: bytes, encoding: str, shape) -> np.ndarray:
    """Payload -> bool (H, W); inverse of `encode_mask`. Anything malformed is a ProtocolError."""
    h, w = check_shape(shape)
    if encoding == "raw":
        data = np.frombuffer(payload, np.uint8)
        if data.size != h * w:
            raise ProtocolError(f"raw mask has {data.size} bytes, header shape {h}x{w} needs {h * w}")
        return data.reshape(h, w).astype(bool)
    if encoding == "png":
        return decode_image(payload, (h, w), cv2.IMREAD_GRAYSCALE) > 127
    if encoding == "rle":
        if len(payload) % 4:
            raise ProtocolError(f"RLE payload of {len(payload)} bytes is not whole uint32 runs")
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
        "valid": result.valid,
        "gap_ms": round(frame.gap_s * 1000, 1),
    }


def dumps(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def loads(data: bytes) -> dict:
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep, huge ints
        raise ProtocolError(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict) or header.get("schema") != SCHEMA_VERSION:
        got = header.get("schema") if isinstance(header, dict) else None
        raise ProtocolError(f"schema version {got!r}, this reader understands {SCHEMA_VERSION}")
    return header
