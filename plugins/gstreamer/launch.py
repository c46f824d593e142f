"""`gst-launch-1.0` run inside this Python: `python plugins/gstreamer/launch.py 'PIPELINE'`.

gst-launch-1.0 embeds Debian's libpython for Python elements; a venv on another build of Python
3.11 (pyenv here) cannot load its compiled modules into that interpreter. Launched from the venv's
own Python, the plugin loader finds libpython already loaded and runs `syndiffseg` in it.
Exit status 0 at end of stream, 1 on a pipeline error (printed as one line).
"""

import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import Gst  # noqa: E402


def launch(description: str, timeout_s: float | None = None) -> int:
    Gst.init(None)
    try:
        pipeline = Gst.parse_launch(description)
    except gi.repository.GLib.Error as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    bus = pipeline.get_bus()
    pipeline.set_state(Gst.State.PLAYING)
    wait = Gst.CLOCK_TIME_NONE if timeout_s is None else int(timeout_s * Gst.SECOND)
    try:
        msg = bus.timed_pop_filtered(wait, Gst.MessageType.EOS | Gst.MessageType.ERROR)
    finally:
        pipeline.set_state(Gst.State.NULL)
    if msg is None:
        print(f"error: no end of stream within {timeout_s} s", file=sys.stderr)
        return 1
    if msg.type == Gst.MessageType.ERROR:
        err, _ = msg.parse_error()
        print(f"error: {err.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python plugins/gstreamer/launch.py 'filesrc location=in.mp4 ! decodebin ! ...'")
    sys.exit(launch(" ".join(sys.argv[1:])))
