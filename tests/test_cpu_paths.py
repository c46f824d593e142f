"""cpu_paths: the CPU inference paths, their guards, and the choice `--backend auto` makes on a CPU
(with faked probes: timings on a shared machine are not test material)."""

from __future__ import annotations

import importlib.util
import json
import threading

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from conftest import rt_make_tiny_segmenter
from syndiff_stream import cpu_paths
from syndiff_stream.backends import (BackendError, OnnxBackend, OpenVinoBackend, OrtOptions, export_onnx, fold_stem,
                                     fold_time_embedding, make_backend, model_hash, ort_graph_ops,
                                     onnx_cache_path)
from syndiff_stream.cli import app
from syndiff_stream.cpu_paths import (PATHS, BF16_FLAGS, build_path, cache_key, candidates, choice_file, choose, pick,
                                      record_parity, unavailable)

AVX2 = {"model": "AMD EPYC 7B12", "vector_extensions": ["sse4_2", "avx", "avx2", "fma", "f16c"], "kernel_capability": "AVX2"}
SAPPHIRE = {"model": "Intel Xeon Platinum 8480+", "vector_extensions": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"],
            "kernel_capability": "AVX512"}
HAS_BF16 = bool(set(BF16_FLAGS) & set(cpu_paths.cpu_facts()["vector_extensions"]))
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNDIFF_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def exported(rt_tiny_segmenter, cache):
    """The tiny model's ONNX file in the cache, made by the fast exporter (the paths then load it)."""
    OnnxBackend(rt_tiny_segmenter, threads=1, dynamo=False)
    return rt_tiny_segmenter


def x_batch(n=3, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- guards -------------------------------------------------------------------------------------

def test_bf16_paths_say_plainly_they_are_not_available_on_avx2():
    why = unavailable(PATHS["eager-bf16"], AVX2)
    assert why == ("eager-bf16: not available here: needs a CPU with avx512_bf16 or amx_bf16 "
                   "(AMD EPYC 7B12 has sse4_2, avx, avx2, fma, f16c)")
    assert unavailable(PATHS["compile-bf16"], AVX2).startswith("compile-bf16: not available here")
    assert unavailable(PATHS["eager-bf16"], SAPPHIRE) is None
    assert all(unavailable(p, AVX2) is None for p in PATHS.values() if p.precision == "fp32" and p.kind != "compile"
               or p.name == "onnx-daz")


@pytest.mark.skipif(HAS_BF16, reason="this CPU has native bf16")
def test_bf16_path_refuses_to_build_here(rt_tiny_segmenter):
    with pytest.raises(BackendError, match="eager-bf16: not available here"):
        make_backend("eager-bf16", rt_tiny_segmenter)


def test_bf16_path_runs_once_its_guard_passes(rt_tiny_segmenter, monkeypatch):
    """On a CPU with AMX it is oneDNN's bf16; here the guard is faked and torch emulates bf16."""
    monkeypatch.setattr(cpu_paths, "cpu_facts", lambda: SAPPHIRE)
    backend = make_backend("eager-bf16", rt_tiny_segmenter)
    assert backend.cpu_path == "eager-bf16" and backend.bf16 and backend.channels_last
    prob = backend.infer(x_batch())
    assert prob.dtype == torch.float32 and prob.shape == (3, 1, 64, 64)
    assert (prob - rt_tiny_segmenter.predict_proba(x_batch())).abs().max() < 0.1


def test_compile_needs_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(cpu_paths.shutil, "which", lambda name: None)
    assert "needs a C++ compiler" in unavailable(PATHS["compile"], AVX2)


def test_frozen_compile_paths_ask_inductor_to_freeze_the_weights(rt_tiny_segmenter, monkeypatch):
    """Freezing is an inductor setting passed with the compile call; the unfrozen paths leave it off."""
    import syndiff_stream.backends as backends

    calls = []
    monkeypatch.setattr(backends.torch, "compile", lambda module, **kw: calls.append(kw) or module)
    frozen = make_backend("compile-frozen-cl", rt_tiny_segmenter)
    make_backend("compile", rt_tiny_segmenter)
    assert calls[0]["options"] == {"freezing": True} and calls[1]["options"] is None
    assert frozen.cpu_path == "compile-frozen-cl" and frozen.channels_last
    assert torch.allclose(frozen.infer(x_batch()), rt_tiny_segmenter.predict_proba(x_batch()), atol=1e-5)


def test_int8_paths_need_calibration_frames(rt_tiny_segmenter):
    with pytest.raises(BackendError, match=r"onnx-int8-qop: needs calibration frames: --calibration"):
        make_backend("onnx-int8-qop", rt_tiny_segmenter)
    with pytest.raises(BackendError, match="only the int8 CPU paths|int8 CPU paths"):
        make_backend("onnx", rt_tiny_segmenter, calibration="frames/")


def test_every_path_has_a_distinct_configuration():
    seen = {(p.kind, p.precision, p.ort, p.graph, p.int8, p.channels_last, p.freezing) for p in PATHS.values()}
    assert len(seen) == len(PATHS)
    assert all(p.exact == (p.precision == "fp32" and not p.ort.denormal_as_zero) for p in PATHS.values())


# ---- the paths run, and the fp32 ones agree with the model --------------------------------------

def test_onnx_session_options_reach_the_session(exported):
    backend = make_backend("onnx-noarena", exported, threads=1)
    opts = backend.session.get_session_options()
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    assert make_backend("onnx-daz", exported, threads=1).options.denormal_as_zero
    for name in ("onnx-extended", "onnx-layout", "onnx-spin", "onnx-daz", "eager-cl"):
        prob = make_backend(name, exported, threads=1).infer(x_batch())
        assert torch.allclose(prob, exported.predict_proba(x_batch()), atol=1e-4), name


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed (pip install 'syndiff-stream[openvino]')")
def test_openvino_runs_the_onnx_file_to_the_same_probabilities(exported):
    backend = make_backend("openvino", exported, threads=2)
    assert backend.path == onnx_cache_path(exported) and backend.cpu_path == "openvino"
    want = exported.predict_proba(x_batch())
    assert torch.allclose(backend.infer(x_batch()), want, atol=1e-4)
    assert backend.configure(2) == 2  # two callers at once, each on its own stream and request
    results = {}

    def call(k):
        results[k] = backend.infer(x_batch(seed=k))

    workers = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for k in range(2):
        assert torch.allclose(results[k], exported.predict_proba(x_batch(seed=k)), atol=1e-4)


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed (pip install 'syndiff-stream[openvino]')")
def test_openvino_asks_for_bf16_only_on_its_bf16_path(exported, monkeypatch):
    """OpenVINO would pick bf16 by itself on an AMX CPU; the fp32 path must pin f32 there."""
    assert make_backend("openvino", exported, threads=1).precision == "f32"
    monkeypatch.setattr(cpu_paths, "cpu_facts", lambda: SAPPHIRE)  # the guard; on AVX2 OpenVINO stays f32
    backend = make_backend("openvino-bf16", exported, threads=1)
    assert backend.cpu_path == "openvino-bf16" and backend.precision == "bf16"
    prob = backend.infer(x_batch())
    err = (prob - exported.predict_proba(x_batch())).abs()  # bf16 keeps 8 bits: a random tiny model drifts
    assert prob.dtype == torch.float32 and err.mean() < 0.02 and err.max() < 0.5, (err.mean(), err.max())
    with pytest.raises(BackendError, match="openvino precision 'fp8'"):
        OpenVinoBackend(exported, threads=1, precision="fp8")


def test_openvino_missing_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert unavailable(PATHS["openvino"], AVX2) == "openvino: needs OpenVINO: pip install 'syndiff-stream[openvino]'"


def test_folded_stem_computes_the_same_probabilities(rt_tiny_segmenter):
    folded = fold_stem(rt_tiny_segmenter)
    assert isinstance(rt_tiny_segmenter.vision_encoder.stem, torch.nn.PixelUnshuffle)  # the original untouched
    assert isinstance(folded.vision_encoder.stem, torch.nn.Identity)
    assert folded.vision_encoder.encoder.conv_in.stride == (4, 4)
    assert torch.allclose(folded.predict_proba(x_batch()), rt_tiny_segmenter.predict_proba(x_batch()), atol=1e-5)


def test_folded_time_embedding_is_exact_at_the_inference_timestep(rt_tiny_segmenter):
    folded = fold_time_embedding(rt_tiny_segmenter)
    assert torch.allclose(folded.predict_proba(x_batch()), rt_tiny_segmenter.predict_proba(x_batch()), atol=1e-5)
    other = rt_tiny_segmenter.config.inference_timestep // 2  # the fold holds for that one timestep only
    assert not torch.allclose(folded.predict_proba(x_batch(), other), rt_tiny_segmenter.predict_proba(x_batch(), other),
                              atol=1e-5)
    assert rt_tiny_segmenter.unet.down_blocks[0].resnets[0].time_emb_proj.__class__ is torch.nn.Linear  # untouched


def test_fused_export_has_no_time_mlp(rt_tiny_segmenter, tmp_path):
    paths = {g: export_onnx(rt_tiny_segmenter, tmp_path / f"{g}.onnx", graph=g) for g in ("fused", "plain")}
    ops = {g: [n.op_type for n in onnx.load(str(p)).graph.node] for g, p in paths.items()}
    assert {"Sin", "Cos"} <= set(ops["plain"]) and not {"Sin", "Cos"} & set(ops["fused"])  # the timestep's sinusoids
    run = {g: list(ort_graph_ops(p, OrtOptions(level="extended")).elements()) for g, p in paths.items()}  # the constant joins the convolutions' bias
    blocks = sum(r.time_emb_proj is not None for r in rt_tiny_segmenter.unet.modules() if hasattr(r, "time_emb_proj"))
    assert run["fused"].count("Add") <= run["plain"].count("Add") - blocks


def test_disabled_optimizers_reach_the_session(rt_tiny_segmenter, tmp_path):
    path = export_onnx(rt_tiny_segmenter, tmp_path / "f.onnx")
    fused = OnnxBackend(rt_tiny_segmenter, onnx_path=path, threads=1)
    unfused = OnnxBackend(rt_tiny_segmenter, onnx_path=path, threads=1,
                          options=OrtOptions(disabled_optimizers=("QuickGeluFusion",)))
    assert torch.allclose(fused.infer(x_batch()), unfused.infer(x_batch()), atol=1e-5)
    ran = {name: ort_graph_ops(path, OrtOptions(level="extended", disabled_optimizers=disabled)) for name, disabled in
           (("fused", ()), ("unfused", ("QuickGeluFusion",)))}
    assert "QuickGelu" in ran["fused"] and "QuickGelu" not in ran["unfused"] and "Sigmoid" in ran["unfused"]


def test_fused_export_has_no_stem_transpose_nor_unit_mean(rt_tiny_segmenter, tmp_path):
    fused = export_onnx(rt_tiny_segmenter, tmp_path / "f.onnx", dynamo=False)
    plain = export_onnx(rt_tiny_segmenter, tmp_path / "p.onnx", dynamo=False, graph="plain")
    ops = {name: [n.op_type for n in onnx.load(str(p)).graph.node] for name, p in (("fused", fused), ("plain", plain))}
    assert "ReduceMean" in ops["plain"] and "ReduceMean" not in ops["fused"]
    assert ops["fused"].count("Transpose") < ops["plain"].count("Transpose")
    a = OnnxBackend(rt_tiny_segmenter, onnx_path=fused, threads=1).infer(x_batch())
    b = OnnxBackend(rt_tiny_segmenter, onnx_path=plain, threads=1).infer(x_batch())
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, rt_tiny_segmenter.predict_proba(x_batch()), atol=1e-3)


def test_fused_and_plain_graphs_are_cached_apart(rt_tiny_segmenter, cache):
    assert onnx_cache_path(rt_tiny_segmenter) != onnx_cache_path(rt_tiny_segmenter, "plain")
    assert onnx_cache_path(rt_tiny_segmenter).parent == cache / "onnx"


# ---- the choice ---------------------------------------------------------------------------------

def test_pick_keeps_the_default_unless_another_is_clearly_faster():
    assert pick({"onnx": 100.0, "onnx-spin": 104.0, "eager": 20.0}) == "onnx"  # within the probe's noise
    assert pick({"onnx": 100.0, "onnx-spin": 120.0}) == "onnx-spin"
    assert pick({"eager": 20.0, "eager-cl": 30.0}) == "eager-cl"  # no ONNX Runtime: the fastest there is


def test_cache_key_follows_cpu_model_hash_and_threads():
    key = cache_key(AVX2, "abc", 2)
    assert key == cache_key(dict(AVX2), "abc", 2)
    assert len({key, cache_key(SAPPHIRE, "abc", 2), cache_key(AVX2, "abd", 2), cache_key(AVX2, "abc", 1),
                cache_key({**AVX2, "vector_extensions": AVX2["vector_extensions"] + ["avx512f"]}, "abc", 2)}) == 5


def test_candidates_are_exact_paths_and_recorded_passes(monkeypatch, cache):
    timed, skipped = candidates("h1", AVX2)
    assert "onnx" in timed and "eager" in timed and "onnx-daz" not in timed
    assert "no parity recorded" in skipped["onnx-daz"] and "not available here" in skipped["eager-bf16"]
    assert "tools/speed_paths.py" in skipped["compile"] and "calibration" in skipped["onnx-int8"]
    record_parity("h1", {"onnx-daz": {"ok": True}, "eager-cl": {"ok": False}}, AVX2)
    timed, _ = candidates("h1", AVX2)
    assert "onnx-daz" in timed  # a lower-precision path that passed parity here may be chosen
    assert "eager-cl" in timed  # an exact path is a candidate whatever a record says
    assert "onnx-daz" not in candidates("h1", {**AVX2, "model": "AMD EPYC 9654"})[0]  # passed on another CPU
    record_parity("h1", {"onnx-daz": {"ok": False}}, AVX2)
    assert "onnx-daz" not in candidates("h1", AVX2)[0]  # failed since: an option, never a default


def test_choose_takes_the_fastest_probe_and_caches_it(exported, monkeypatch):
    speeds = {"onnx": 50.0, "onnx-layout": 49.0, "onnx-spin": 51.0, "onnx-noarena": 70.0, "eager": 5.0, "eager-cl": 6.0}
    if HAS_OPENVINO:
        speeds["openvino"] = 40.0
    probed = []

    def probe(backend):
        probed.append(backend.cpu_path)
        return speeds[backend.cpu_path]

    choice = choose(exported, threads=1, probe=probe)
    assert choice.path == "onnx-noarena" and choice.source == "probe" and choice.threads == 1
    assert set(choice.fps) == set(speeds) and sorted(probed) == sorted(list(speeds) * cpu_paths.PROBE_ROUNDS)
    assert choice.model_hash == model_hash(exported)
    assert choice_file(choice.key).is_file()
    assert "cpu path: onnx-noarena (probed now, 1 threads on" in choice.line()

    again = choose(exported, threads=1, probe=lambda backend: 1 / 0)  # cached: no probe at all
    assert again.path == "onnx-noarena" and again.source == "cache"
    other = choose(exported, threads=2, probe=lambda backend: speeds[backend.cpu_path] if backend.cpu_path != "onnx-noarena" else 1.0)
    assert other.path == "onnx" and other.key != choice.key  # another thread count is probed afresh


def test_an_unreadable_cached_choice_is_probed_again(exported):
    key = cache_key(cpu_paths.cpu_facts(), model_hash(exported), 1)
    choice_file(key).parent.mkdir(parents=True, exist_ok=True)
    choice_file(key).write_text("{not json")
    assert choose(exported, threads=1, probe=lambda backend: 10.0).source == "probe"


# ---- the CLI says which path it chose; an explicit backend wins ----------------------------------

def test_bench_auto_says_which_path_it_chose(rt_tiny_model_dir, exported, monkeypatch):
    monkeypatch.setattr(cpu_paths, "probe_fps", lambda backend: {"onnx": 10.0}.get(backend.cpu_path, 1.0))
    result = CliRunner().invoke(app, ["bench", "--model", str(rt_tiny_model_dir), "--frames", "4", "--threads", "1",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cpu_path"] == "onnx" == report["cpu_path_choice"]["path"]
    assert report["backend"] == "onnx" and report["cpu_path_choice"]["fps"]["onnx"] == 10.0
    assert "cpu path: onnx (probed now" in result.stderr


def test_an_explicit_backend_is_not_probed(rt_tiny_model_dir, exported, monkeypatch):
    def no_choice(*args, **kwargs):
        raise AssertionError("an explicit backend must not probe")

    monkeypatch.setattr(cpu_paths, "choose", no_choice)
    result = CliRunner().invoke(app, ["bench", "--model", str(rt_tiny_model_dir), "--frames", "4", "--threads", "1",
                                      "--device", "cpu", "--backend", "onnx-noarena", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cpu_path"] == "onnx-noarena" and report["cpu_path_choice"] is None
    assert "cpu path:" not in result.stderr


def test_an_unavailable_path_is_one_line_from_the_cli(rt_tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cpu_paths, "cpu_facts", lambda: AVX2)
    result = CliRunner().invoke(app, ["bench", "--model", str(rt_tiny_model_dir), "--frames", "2", "--device", "cpu",
                                      "--backend", "compile-bf16"])
    assert result.exit_code == 2
    assert "error: compile-bf16: not available here: needs a CPU with avx512_bf16 or amx_bf16" in result.stderr


def test_every_path_is_named_by_the_unknown_backend_error(rt_tiny_segmenter):
    with pytest.raises(BackendError) as err:
        make_backend("fastest", rt_tiny_segmenter)
    assert all(name in str(err.value) for name in PATHS)
    assert np.isfinite(make_backend("eager-cl", rt_tiny_segmenter).infer(x_batch()).numpy()).all()
    assert build_path("eager", rt_make_tiny_segmenter()).cpu_path == "eager"


def test_channels_last_paths_leave_the_shared_model_as_it_is(rt_tiny_segmenter):
    backend = make_backend("eager-cl", rt_tiny_segmenter)
    conv = rt_tiny_segmenter.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    assert backend.seg is not rt_tiny_segmenter
    assert backend.seg.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
