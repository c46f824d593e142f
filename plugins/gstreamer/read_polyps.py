"""Print the polyps `syndiffseg mode=meta` attached, one JSON line per frame.

    python plugins/gstreamer/read_polyps.py 'filesrc location=in.mp4 ! decodebin ! videoconvert ! syndiffseg mode=meta ! appsink name=sink'

Each line: {"pts": seconds, "polyps": [{"box": [x0, y0, x1, y1], "score", "area", "mask_pixels"}]},
read from the GstVideoRegionOfInterestMeta of each buffer and its "syndiff-polyp" structure (the
mask inside the box is a base64 PNG). The pipeline must end in an appsink named `sink`.
"""

import base64
import json
import sys

import cv2
import gi
import numpy as np

gi.require_version("Gst", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import Gst, GstVideo  # noqa: E402


def polyps_of(buf) -> list[dict]:
    """syndiffseg numbers its ROI metas 0..n-1 (PyGObject cannot walk a buffer's metas itself)."""
    out = []
    for ident in range(buf.get_n_meta(GstVideo.VideoRegionOfInterestMeta.get_info().api)):
        roi = GstVideo.buffer_get_video_region_of_interest_meta_id(buf, ident)
        param = roi.get_param("syndiff-polyp")
        png = np.frombuffer(base64.b64decode(param.get_value("mask")), np.uint8)
        mask = cv2.imdecode(png, cv2.IMREAD_GRAYSCALE) > 0
        out.append({"box": [roi.x, roi.y, roi.x + roi.w, roi.y + roi.h], "score": round(param.get_value("score"), 4),
                    "area": param.get_value("area"), "mask_pixels": int(mask.sum())})
    return out


def main(description: str) -> int:
    Gst.init(None)
    pipeline = Gst.parse_launch(description)
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    while True:
        sample = sink.emit("try-pull-sample", 30 * Gst.SECOND)
        if sample is None:
            break
        buf = sample.get_buffer()
        print(json.dumps({"pts": buf.pts / Gst.SECOND, "polyps": polyps_of(buf)}), flush=True)
    msg = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
    pipeline.set_state(Gst.State.NULL)
    if msg is not None:
        print(f"error: {msg.parse_error()[0].message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(" ".join(sys.argv[1:])))
