"""Security: no unpickling anywhere, loopback unless told otherwise, CURVE encryption and
authentication, and patient video (overlays) never published unless asked for."""

from __future__ import annotations

import ast
import pickle
import shutil
import stat
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zmq
import zmq.auth
from typer.testing import CliRunner

from syndiff_stream.cli import app
from syndiff_stream.keys import make_keys
from syndiff_stream.model import CheckpointError, Segmenter
from syndiff_stream.publish import Publisher, RemoteBindWarning, is_local
from syndiff_stream.subscribe import Subscriber
from test_publish import result as make_result

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "syndiff_stream"
SCANNED = [PACKAGE, ROOT / "trainer", ROOT / "plugins", ROOT / "examples"]  # everything that ships or runs
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# ---- never unpickle -------------------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {"torch.load", "torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                    "pd.read_pickle", "pandas.read_pickle",
                    # tries TorchScript (pickle) before torch.export.load: engines load with the latter
                    "torch_tensorrt.load", "torch_tensorrt.runtime.load", "torch_tensorrt.ts.load"}


def dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unpickling(source: str) -> list[str]:
    """What in `source` can unpickle: pickle-family imports, torch.load & co, allow_pickle=True,
    weights_only=False."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in UNPICKLING_MODULES:
                found.append(module)
            found += [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in UNPICKLING_CALLS]
        elif isinstance(node, ast.Call):
            if dotted(node.func) in UNPICKLING_CALLS:
                found.append(dotted(node.func))
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in (("allow_pickle", True),
                                                                                     ("weights_only", False)):
                    found.append(f"{dotted(node.func)}({kw.arg}={kw.value.value})")
    return found


def test_the_scanner_finds_unpickling():
    assert unpickling("import pickle\nimport dill as d\nfrom joblib import load") == ["pickle", "dill", "joblib"]
    assert unpickling("torch.load(f)\nfrom torch import load\nnp.load(p, allow_pickle=True)") == [
        "torch.load", "torch.load", "np.load(allow_pickle=True)"]
    assert unpickling("x = torch.jit.load(p, weights_only=False)") == ["torch.jit.load", "torch.jit.load(weights_only=False)"]
    assert unpickling("import torch_tensorrt\nm = torch_tensorrt.load(p)") == ["torch_tensorrt.load"]
    assert unpickling("json.load(f)\nnp.load(p)\nsafe_open(p, framework='pt')\nload_file(p)") == []


@pytest.mark.parametrize("folder", SCANNED, ids=lambda p: p.name)
def test_nothing_that_ships_unpickles(folder):
    found = {str(p.relative_to(ROOT)): unpickling(p.read_text()) for p in sorted(folder.rglob("*.py"))}
    assert len(found) >= 5  # the folder was really scanned
    assert {k: v for k, v in found.items() if v} == {}


class Trap:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_named_model_safetensors_is_rejected_unopened(tmp_path, rt_tiny_model_dir, writer):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Trap(proof)))
    assert proof.exists()  # the trap works: unpickling it leaves a file

    marker, model = tmp_path / "unpickled", tmp_path / "model"
    shutil.copytree(rt_tiny_model_dir, model)
    weights = model / "model.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps({"unet.weight": Trap(marker)}))
    else:
        torch.save({"unet.weight": Trap(marker)}, weights)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Segmenter.from_pretrained(model)
    result = invoke("run", "demo", "--model", model, "--backend", "eager", "--publish", "", "--max-frames", 1)
    assert result.exit_code == 2 and "safetensors" in result.output
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".onnx", ".ep", ".pt"])
def test_an_engine_that_is_a_pickle_is_rejected_unopened(tmp_path, rt_tiny_model_dir, suffix):
    marker, engine = tmp_path / "unpickled", tmp_path / f"engine{suffix}"
    torch.save({"engine": Trap(marker)}, engine)
    result = invoke("run", "demo", "--model", rt_tiny_model_dir, "--engine", engine, "--publish", "",
                    "--max-frames", 1)
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.output and not marker.exists()


# ---- loopback unless told otherwise ---------------------------------------------------------------

@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://127.0.0.2:5556", True), ("tcp://[::1]:5556", True),
    ("tcp://localhost:5556", True), ("ipc:///tmp/masks", True), ("inproc://masks", True),
    ("tcp://0.0.0.0:5556", False), ("tcp://*:5556", False), ("tcp://[::]:5556", False),
    ("tcp://192.168.1.20:5556", False), ("tcp://eth0:5556", False), ("tcp://scope-cart.local:5556", False),
])
def test_which_endpoints_are_local(endpoint, local):
    assert is_local(endpoint) is local


class FakeSocket:
    closed = False

    def __init__(self):
        self.bound = []

    def setsockopt(self, *args):
        pass

    def bind(self, endpoint):
        self.bound.append(endpoint)

    def close(self, linger=None):
        self.closed = True


class FakeContext:
    """Stands in for ZeroMQ so no test ever opens a port beyond loopback."""

    def socket(self, kind):
        self.made = FakeSocket()
        return self.made


def test_a_remote_bind_needs_allow_remote_and_warns():
    fake = FakeContext()
    with pytest.raises(ValueError, match="--allow-remote"):
        Publisher("tcp://0.0.0.0:5556", context=fake)
    assert not hasattr(fake, "made")  # refused before any socket existed
    with pytest.warns(RemoteBindWarning, match="anyone who connects"):
        Publisher("tcp://0.0.0.0:5556", context=fake, allow_remote=True)
    assert fake.made.bound == ["tcp://0.0.0.0:5556"]


def test_run_refuses_a_remote_publish_address(rt_tiny_model_dir):
    result = invoke("run", "demo", "--model", rt_tiny_model_dir, "--backend", "eager",
                    "--publish", "tcp://0.0.0.0:5556", "--max-frames", 1)
    assert result.exit_code == 2 and "--allow-remote" in result.output.strip().splitlines()[-1]


# ---- CURVE ----------------------------------------------------------------------------------------

def test_keys_command_writes_certificates_private_to_their_owner(tmp_path):
    out = tmp_path / "keys"
    result = invoke("keys", "--out", out, "--client", "viewer", "--client", "recorder")
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "authorized/recorder.key", "authorized/viewer.key", "recorder.key_secret", "server.key",
        "server.key_secret", "viewer.key_secret"]
    for secret in out.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and zmq.auth.load_certificate(secret)[1]
    assert all(zmq.auth.load_certificate(p)[1] is None for p in (out / "authorized").iterdir())
    server = zmq.auth.load_certificate(out / "server.key_secret")
    again = invoke("keys", "--out", out)
    assert again.exit_code == 2 and "--force" in again.output
    assert invoke("keys", "--out", out, "--force").exit_code == 0
    assert zmq.auth.load_certificate(out / "server.key_secret") != server


def test_curve_publisher_serves_only_authorised_subscribers(tmp_path, rt_endpoint):
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_keys(keys, ("viewer",))
    make_keys(other, ("intruder",))  # a valid key pair the publisher was never given
    pub = Publisher(rt_endpoint, encoding="rle", curve_secret=keys / "server.key_secret",
                    curve_allow=keys / "authorized")
    viewer = Subscriber(rt_endpoint, curve_secret=keys / "viewer.key_secret", curve_server=keys / "server.key")
    intruder = Subscriber(rt_endpoint, curve_secret=other / "intruder.key_secret", curve_server=keys / "server.key")
    plain = Subscriber(rt_endpoint)
    try:
        assert pub.wait_for_subscribers(1, timeout=10)
        assert not pub.wait_for_subscribers(2, timeout=1)  # the others never got as far as subscribing
        for i in range(5):
            pub.write(make_result(i))
        got = [viewer.recv(timeout=5) for _ in range(5)]
        assert [m.header["frame_index"] for m in got] == list(range(5))
        assert np.array_equal(got[0].mask, make_result().mask)
        assert intruder.recv(timeout=1) is None and plain.recv(timeout=0.2) is None
    finally:
        for sub in (viewer, intruder, plain):
            sub.close()
        pub.close(linger=0)


def test_curve_options_are_checked(tmp_path, rt_endpoint):
    make_keys(tmp_path, ("viewer",))
    with pytest.raises(ValueError, match="no secret key"):
        Publisher(rt_endpoint, curve_secret=tmp_path / "server.key")
    with pytest.raises(ValueError, match="needs --curve-secret"):
        Publisher(rt_endpoint, curve_allow=tmp_path / "authorized")
    with pytest.raises(ValueError, match="not a folder"):
        Publisher(rt_endpoint, curve_secret=tmp_path / "server.key_secret", curve_allow=tmp_path / "nope")
    with pytest.raises(ValueError, match="both"):
        Subscriber(rt_endpoint, curve_secret=tmp_path / "viewer.key_secret")
    Publisher(rt_endpoint).close(linger=0)  # the failed attempts left the port free


# ---- patient video stays home ---------------------------------------------------------------------

@pytest.mark.parametrize("asked", [False, True])
def test_overlays_are_published_only_when_asked(rt_tiny_model_dir, rt_video, rt_endpoint, asked):
    spy = zmq.Context.instance().socket(zmq.SUB)  # subscribes to everything the publisher sends
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.setsockopt(zmq.SUBSCRIBE, b"end")  # counted by --wait-subscribers
    spy.connect(rt_endpoint)
    messages = []

    def collect():
        while spy.poll(30_000):
            messages.append(spy.recv_multipart())
            if messages[-1][0] == b"end":
                return

    reader = threading.Thread(target=collect)
    reader.start()
    result = invoke("run", rt_video, "--model", rt_tiny_model_dir, "--backend", "eager", "--publish", rt_endpoint,
                    "--wait-subscribers", 1, "--quiet", *(["--publish-overlay"] if asked else []))
    reader.join(timeout=60)
    spy.close(linger=0)
    assert result.exit_code == 0, result.output
    topics = {m[0] for m in messages}
    images = [cv2.imdecode(np.frombuffer(m[2], np.uint8), cv2.IMREAD_UNCHANGED) for m in messages if m[2]]
    colour = [im for im in images if im is not None and im.ndim == 3]
    if asked:
        assert b"overlay" in topics and len(colour) == 12
    else:
        assert topics <= {b"mask", b"status", b"end"} and b"mask" in topics and colour == []
