"""GStreamer element `syndiffseg`: polyp segmentation inside any GStreamer pipeline.

    filesrc location=in.mp4 ! decodebin ! videoconvert ! syndiffseg ! videoconvert ! x264enc ! mp4mux ! filesink location=out.mp4

RGB in, RGB out, one frame at a time (GStreamer owns the threads). `mode`:
  overlay  draws the tinted, outlined mask into the frame (in place)
  meta     leaves the pixels alone and attaches one GstVideoRegionOfInterestMeta per polyp
           (roi type "polyp", its box) carrying a "syndiff-polyp" structure: score, area in
           pixels, and the mask inside the box as a base64 PNG; downstream elements or an appsink read them

Loaded by gst-python's plugin loader (GST_PLUGIN_PATH=plugins/gstreamer). The plugin scanner
imports this file in its own process, so everything beyond gi is imported when the element starts.
"""

import base64

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstBase", "1.0")
gi.require_version("GstVideo", "1.0")
from gi.repository import GLib, GObject, Gst, GstBase, GstVideo  # noqa: E402

Gst.init(None)

CAPS = Gst.Caps.from_string("video/x-raw,format=RGB")
MODES = ("overlay", "meta")
META_PARAM = "syndiff-polyp"


class SyndiffSeg(GstBase.BaseTransform):
    __gstmetadata__ = ("syndiff-stream polyp segmentation", "Filter/Effect/Video",
                       "Segments polyps with the single-step latent diffusion segmenter; draws the overlay "
                       "or attaches the masks as region-of-interest metadata", "syndiff-stream")
    __gsttemplates__ = (Gst.PadTemplate.new("sink", Gst.PadDirection.SINK, Gst.PadPresence.ALWAYS, CAPS),
                        Gst.PadTemplate.new("src", Gst.PadDirection.SRC, Gst.PadPresence.ALWAYS, CAPS))
    __gproperties__ = PROPERTIES = {
        "model": (str, "model", "checkpoint folder; empty: the shipped default", "", GObject.ParamFlags.READWRITE),
        "engine": (str, "engine", "engine file from `syndiff-stream export` (.onnx / .ep); overrides backend",
                   "", GObject.ParamFlags.READWRITE),
        "backend": (str, "backend", "eager | compile | onnx | tensorrt", "eager", GObject.ParamFlags.READWRITE),
        "profile": (str, "profile", "calibration profile (.json / .yaml); empty: the model's defaults",
                    "", GObject.ParamFlags.READWRITE),
        "mode": (str, "mode", "overlay (draw in place) | meta (attach masks as ROI metadata)", "overlay",
                 GObject.ParamFlags.READWRITE),
        "smooth": (bool, "smooth", "temporal smoothing (EMA, hysteresis, minimum area)", True,
                   GObject.ParamFlags.READWRITE),
        "device": (str, "device", "cpu | cuda", "cpu", GObject.ParamFlags.READWRITE),
    }

    def __init__(self):
        super().__init__()
        self.props_ = {name: spec[3] for name, spec in self.PROPERTIES.items()}
        self.segmenter = None
        self.info = None

    def do_get_property(self, prop):
        return self.props_[prop.name]

    def do_set_property(self, prop, value):
        if prop.name == "mode" and value not in MODES:
            raise ValueError(f"syndiffseg mode {value!r}: choose {' or '.join(MODES)}")
        self.props_[prop.name] = value

    def do_start(self):
        """Load the model when the pipeline starts: a bad path stops it with one clear error."""
        try:
            from syndiff_stream.segment import FrameSegmenter

            p = self.props_
            self.segmenter = FrameSegmenter.load(p["model"] or None, p["backend"], p["engine"] or None,
                                                 p["profile"] or None, p["device"], p["smooth"])
        except Exception as exc:  # checkpoint, engine, profile and backend errors all stop the pipeline
            message = f"syndiffseg: {exc}"
            error = GLib.Error.new_literal(Gst.ResourceError.quark(), message, Gst.ResourceError.SETTINGS)
            self.post_message(Gst.Message.new_error(self, error, message))
            return False
        return True

    def do_set_caps(self, incaps, outcaps):
        self.info = GstVideo.VideoInfo.new_from_caps(incaps)
        return True

    def do_transform_ip(self, buf):
        import numpy as np

        h, w, stride = self.info.height, self.info.width, self.info.stride[0]
        ok, mapped = buf.map(Gst.MapFlags.READ | Gst.MapFlags.WRITE)
        if not ok:
            return Gst.FlowReturn.ERROR
        try:
            # RGB rows are padded to 4 bytes: view the padded buffer, copy out the frame.
            padded = np.ndarray((h, stride), np.uint8, buffer=mapped.data)
            view = padded[:, :w * 3].reshape(h, w, 3)
            frame = np.ascontiguousarray(view)
            result = self.segmenter(frame)
            if self.props_["mode"] == "overlay":
                view[...] = self.segmenter.overlay(frame, result)
        finally:
            buf.unmap(mapped)
        if self.props_["mode"] == "meta":
            attach_polyps(buf, result)
        return Gst.FlowReturn.OK


def attach_polyps(buf, result) -> None:
    import cv2

    for ident, polyp in enumerate(result.polyps):  # found by the stage chain, as for the CLI
        x0, y0, x1, y1 = polyp.box
        roi = GstVideo.buffer_add_video_region_of_interest_meta(buf, "polyp", x0, y0, x1 - x0, y1 - y0)
        roi.id = ident  # 0..n-1, so readers can fetch each by id (see read_polyps.py)
        ok, png = cv2.imencode(".png", result.mask[y0:y1, x0:x1].astype("uint8") * 255)
        param = Gst.Structure.new_empty(META_PARAM)
        param.set_value("score", float(polyp.score))
        param.set_value("area", int(polyp.area))
        param.set_value("mask", base64.b64encode(png.tobytes()).decode("ascii"))
        roi.add_param(param)


GObject.type_register(SyndiffSeg)
__gstelementfactory__ = ("syndiffseg", Gst.Rank.NONE, SyndiffSeg)
