"""A stalled subscriber next to a healthy one: the healthy one must still get every frame.

Runs a recorded clip through the pipeline, publishing raw masks, with one SUB socket that
connects and never reads and one `Subscriber` that reads everything; prints one JSON line.

    python examples/stalled_subscriber.py clip.mp4 --frames 600
"""

import argparse
import json
import os
import threading

import zmq

from syndiff_stream.backends import make_backend
from syndiff_stream.frames import Mode
from syndiff_stream.model import Segmenter
from syndiff_stream.pipeline import Pipeline
from syndiff_stream.publish import Publisher
from syndiff_stream.sources import open_source
from syndiff_stream.subscribe import Subscriber

parser = argparse.ArgumentParser()
parser.add_argument("source", help="a recorded clip (720x576 for the documented figure)")
parser.add_argument("--frames", type=int, default=600)
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
parser.add_argument("--backend", default="onnx", help="eager | compile | onnx | tensorrt")
parser.add_argument("--publish", default="tcp://127.0.0.1:5558")
args = parser.parse_args()

backend = make_backend(args.backend, Segmenter.from_pretrained(args.model))
publisher = Publisher(args.publish, encoding="raw")
stalled = zmq.Context.instance().socket(zmq.SUB)  # subscribes like a Subscriber, then never reads
stalled.setsockopt(zmq.RCVHWM, 4)
for topic in (b"mask", b"end"):
    stalled.setsockopt(zmq.SUBSCRIBE, topic)
stalled.connect(args.publish)
healthy = Subscriber(args.publish)
publisher.wait_for_subscribers(2, timeout=30)
got = []
reader = threading.Thread(target=lambda: got.extend(m.header["frame_index"] for m in healthy.messages(timeout=120)))
reader.start()
stats = Pipeline(open_source(args.source), backend, [publisher], mode=Mode.RECORDED, max_frames=args.frames).run()
reader.join()
print(json.dumps({"frames_out": stats.frames_out, "healthy_received": len(got), "healthy_missed": healthy.missed,
                  "in_order": got == sorted(got), "e2e_fps": stats.as_dict()["e2e_fps"]}))
healthy.close()
stalled.close(linger=0)
