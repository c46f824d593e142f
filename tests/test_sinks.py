import json

import av
import cv2
import numpy as np

from syndiff_stream.frames import Frame, Result
from syndiff_stream.postprocess import find_polyps
from syndiff_stream.preprocess import FieldOfView
from syndiff_stream.sinks import JsonlSink, MaskFolderSink, OverlayVideoSink


def results(n=5, h=61, w=80):
    for i in range(n):
        mask = np.zeros((h, w), bool)
        mask[10 + i:30 + i, 20:40] = True
        image = np.full((h, w, 3), 120, np.uint8)
        yield Result(Frame(image, "s", i, i / 25), mask.astype(np.float32), mask,
                     find_polyps(mask, mask.astype(np.float32)), FieldOfView.full(h, w), 0.01)


def test_overlay_video_appears_only_when_complete(tmp_path):
    sink = OverlayVideoSink(tmp_path / "o.mp4", fps=25)
    for r in results():
        sink.write(r)
    assert not (tmp_path / "o.mp4").exists()  # still being written under a temporary name
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]
    with av.open(str(tmp_path / "o.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (60, 80, 3)  # odd height trimmed for yuv420p
    assert decoded[0][20, 30, 1] > decoded[0][50, 70, 1] + 30  # the green tint is where the mask is


def test_mask_pngs_and_json_lines(tmp_path):
    masks, lines = MaskFolderSink(tmp_path / "m"), JsonlSink(tmp_path / "f.jsonl")
    rs = list(results(3))
    for r in rs:
        masks.write(r)
        lines.write(r)
    masks.close()
    lines.close()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert np.array_equal(cv2.imread(str(tmp_path / "m" / "000002.png"), cv2.IMREAD_GRAYSCALE) > 0, rs[2].mask)
    records = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in records] == [0, 1, 2]
    assert records[1]["polyps"][0]["box"] == [20, 11, 40, 31] and len(records[1]["polyps"][0]["contour"]) >= 4
