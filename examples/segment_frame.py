"""Segment one frame from Python: image in, mask and polyp boxes out.

    python examples/segment_frame.py polyp.jpg --out mask.png [--model CHECKPOINT]
"""

import argparse
import os

import cv2
import torch

from syndiff_stream.datasets import read_image
from syndiff_stream.model import Segmenter
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.preprocess import prepare, to_source

parser = argparse.ArgumentParser()
parser.add_argument("image")
parser.add_argument("--out", default="mask.png")
parser.add_argument("--model", default=os.environ.get("SYNDIFF_MODEL"), help="default: the shipped checkpoint")
args = parser.parse_args()

seg = Segmenter.from_pretrained(args.model)
frame = read_image(args.image)  # RGB uint8, any size
x, fov = prepare(frame, seg.config.image_size)  # crop the scope's field of view, resize, [-1, 1]
prob = seg.predict_proba(torch.from_numpy(x)[None])[0, 0].numpy()  # one U-Net pass
prob = to_source(prob, fov, *frame.shape[:2])  # back to the frame's resolution
mask = prob >= seg.config.threshold

cv2.imwrite(args.out, mask.astype("uint8") * 255)
for polyp in find_polyps(mask, prob):
    print(f"polyp box={polyp.box} area={polyp.area}px score={polyp.score:.2f}")
print(f"mask -> {args.out}")
