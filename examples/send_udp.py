"""Stream a video file as MPEG-TS over UDP, paced as an encoder or a jittery network delivers it.

    python examples/send_udp.py clip.mp4 udp://127.0.0.1:5600 --pace dts            # even, 1 frame / 40 ms
    python examples/send_udp.py clip.mp4 udp://127.0.0.1:5600 --pace pts            # bursts of 2-4 frames
    python examples/send_udp.py clip.mp4 udp://127.0.0.1:5600 --pace dts --speed 4  # faster than the model
    syndiff-stream run udp://127.0.0.1:5600 --mode live --max-frames 600            # start this first

Packets leave in decode order. Sent when the clock reaches each packet's decode time, they come
evenly; sent at their presentation time, a P-frame shown after its B-frames holds them back and
they all leave at once (B-frame reordering: the bursts a congested link or Wi-Fi also gives).
"""

import argparse
import time

import av

parser = argparse.ArgumentParser()
parser.add_argument("clip")
parser.add_argument("url", help="udp://HOST:PORT")
parser.add_argument("--pace", choices=("dts", "pts"), default="dts")
parser.add_argument("--speed", type=float, default=1.0, help="play this many times faster than real time")
parser.add_argument("--loops", type=int, default=2, help="send the clip this many times")
args = parser.parse_args()

source = av.open(args.clip)
video = source.streams.video[0]
out = av.open(f"{args.url}?pkt_size=1316", "w", format="mpegts", options={"flush_packets": "1"})
stream = out.add_stream_from_template(video)
length = float(video.duration * video.time_base) if video.duration else float(source.duration / 1e6)
start, sent = time.perf_counter(), 0
for loop in range(args.loops):
    source.seek(0)
    for packet in source.demux(video):
        if packet.dts is None:  # the demuxer's final flush packet
            continue
        t = float(getattr(packet, args.pace) * packet.time_base) + loop * length
        delay = start + t / args.speed - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        shift = round(loop * length / packet.time_base)
        packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
        packet.stream = stream
        out.mux(packet)
        sent += 1
out.close()
print(f"{sent} packets, paced by {args.pace} at {args.speed}x -> {args.url}")
