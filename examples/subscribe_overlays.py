"""Subscribe to a running `syndiff-stream run --publish-overlay` and draw each polyp's box and score
on the received overlay frames; saves them as PNGs (works without a display).

    syndiff-stream run demo --publish-overlay &
    python examples/subscribe_overlays.py tcp://127.0.0.1:5556 --out overlays/
"""

import argparse
from pathlib import Path

import cv2

from syndiff_stream.subscribe import Subscriber

parser = argparse.ArgumentParser()
parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5556")
parser.add_argument("--out", type=Path, default=Path("overlays"))
parser.add_argument("--max-frames", type=int, default=100)
parser.add_argument("--timeout", type=float, default=10.0, help="seconds without a message before giving up")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)

count = 0
with Subscriber(args.endpoint, masks=False, overlay=True) as sub:
    for msg in sub.messages(timeout=args.timeout):  # ends at the publisher's end-of-stream
        image = cv2.cvtColor(msg.image, cv2.COLOR_RGB2BGR)
        for polyp in msg.header["polyps"]:
            x0, y0, x1, y1 = polyp["box"]
            cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (0, 220, 255), 2)
            cv2.putText(image, f"{polyp['score']:.2f}", (x0, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (0, 220, 255), 1, cv2.LINE_AA)
        cv2.imwrite(str(args.out / f"{msg.header['frame_index']:06d}.png"), image)
        count += 1
        if count >= args.max_frames:
            break
print(f"{count} overlays -> {args.out}, latency of the last {msg.header['latency_ms'] if count else '-'} ms")
