"""onnxcc.benchmark (interleaved benchmark, profiler aggregation), its command and tables, and onnxcc.latency."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import graphs
from onnxcc import benchmark, latency
from onnxcc.cli.commands import cmd_bench
from onnxcc.cli.render import bench_tables
from onnxcc.errors import InputShapeError, UsageError


@pytest.fixture(scope="module")
def two_models() -> list[onnx.ModelProto]:
    return [graphs.tiny_resnet(), graphs.tiny_mobilenet()]


def test_benchmark_structure(two_models):
    r = benchmark.benchmark(two_models, runs=7, warmup=1, per_round=3)
    assert [m["name"] for m in r["models"]] == ["tiny_resnet", "tiny_mobilenet"]
    assert r["provider"] == "cpu" and r["threads"] == 0 and r["runs"] == 7
    for m in r["models"]:
        assert m["n"] == 7 and len(m["latencies_ms"]) == 7
        assert 0 < m["min_ms"] <= m["p50_ms"] <= m["p90_ms"]
        assert m["mean_ms"] > 0 and m["std_ms"] >= 0 and m["speedup"] > 0
        assert m["input_shapes"] == {"x": [1, 3, 16, 16]}
        assert "profile" not in m
    assert r["models"][0]["speedup"] == 1.0
    json.dumps(r)  # the --json output must serialise


def test_benchmark_time_bound_stops_after_whole_rounds(two_models):
    r = benchmark.benchmark(two_models, runs=50, warmup=0, per_round=3, seconds=0.0)
    assert r["runs"] == 3 and [m["n"] for m in r["models"]] == [3, 3]
    r = benchmark.benchmark(two_models, runs=7, warmup=0, per_round=3, seconds=1e6)
    assert r["runs"] == 7


def test_runs_are_interleaved_in_rounds(two_models, monkeypatch):
    calls: list[str] = []
    real = benchmark.make_session

    class Recorder:
        def __init__(self, sess, name):
            self.sess, self.name = sess, name

        def run(self, *a, **k):
            calls.append(self.name)
            return self.sess.run(*a, **k)

    monkeypatch.setattr(benchmark, "make_session", lambda m, *a, **k: Recorder(real(m, *a, **k), m.graph.name))
    benchmark.benchmark(two_models, runs=7, warmup=2, per_round=3)
    a, b = "tiny_resnet", "tiny_mobilenet"
    warm = [a] * 2 + [b] * 2
    rounds = [a] * 3 + [b] * 3 + [a] * 3 + [b] * 3 + [a] + [b]
    assert calls == warm + rounds


def test_same_signature_shares_feeds_and_batch_applies(two_models):
    feeds = benchmark._feeds(two_models, None, batch=1, seed=0)
    assert feeds[0] is feeds[1]
    other = benchmark._feeds([two_models[0], graphs.transpose_nhwc()], None, batch=1, seed=0)
    assert other[1]["x"].shape == (1, 8, 8, 3)
    with pytest.raises(InputShapeError, match="cannot run"):  # the test graphs have batch fixed to 1
        benchmark.benchmark(two_models[:1], batch=2, runs=1, warmup=0)


def test_profile_reports_model_op_types(two_models):
    r = benchmark.benchmark(two_models[:1], runs=4, warmup=1, profile=True, top=3)
    prof = r["models"][0]["profile"]
    ops = {d["op_type"]: d for d in prof["by_op_type"]}
    assert "Conv" in ops and ops["Conv"]["ms"] > 0 and ops["Conv"]["count"] == 10
    assert "Gemm" in ops
    assert prof["runs"] == 4 and len(prof["top_nodes"]) == 3
    assert sum(d["pct"] for d in prof["by_op_type"]) == pytest.approx(100, abs=0.5)


def test_trace_split_per_run_and_aggregated():
    def node(ts, dur, name, op):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [node(410, 50, "c0", "Conv"), node(450, 10, "r0", "Relu"),  # out of order on purpose
              {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              node(10, 90, "c0", "Conv"),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
              node(210, 30, "c0", "Conv"), node(250, 10, "r0", "Relu"),
              {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
              {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 1}]
    runs = benchmark.split_runs(events)
    assert [[e["ts"] for e in r] for r in runs] == [[10], [210, 250], [410, 450]]
    p = benchmark.aggregate_trace(runs[1:], top=1)  # the first run is a warm-up
    assert p["runs"] == 2 and p["kernel_ms"] == pytest.approx(0.05)
    assert p["by_op_type"][0] == {"op_type": "Conv", "ms": 0.04, "count": 1, "pct": 80.0}
    assert p["top_nodes"] == [{"node": "c0", "op_type": "Conv", "ms": 0.04, "pct": 80.0}]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is present")
def test_cuda_without_cuda_is_a_usage_error(two_models):
    with pytest.raises(UsageError, match="CUDA"):
        benchmark.benchmark(two_models, provider="cuda", runs=1)
    with pytest.raises(UsageError, match="CUDA"):
        latency.LatencyTable("cuda")


def test_cmd_bench_json(two_models, tmp_path, capsys):
    paths = []
    for m in two_models:
        paths.append(tmp_path / f"{m.graph.name}.onnx")
        onnx.save(m, str(paths[-1]))
    args = argparse.Namespace(models=paths, provider="cpu", threads=1, batch=1, runs=3,
                              input_shape=["1,3,16,16"], profile=False, json=True)
    assert cmd_bench(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in d["models"]] == ["tiny_resnet.onnx", "tiny_mobilenet.onnx"]
    assert d["threads"] == 1 and all(m["n"] == 3 for m in d["models"])


def test_render_bench_prints_tables(two_models):
    from rich.console import Console

    console = Console(record=True, width=150)
    bench_tables(benchmark.benchmark(two_models, runs=2, warmup=0, profile=True, top=2), console)
    text = console.export_text()
    assert "tiny_mobilenet" in text and "speedup" in text and "Conv" in text


@pytest.fixture
def counted_measure(monkeypatch, tmp_path):
    """Cache in a temp dir; count how many chains really get timed."""
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))
    measured: list = []
    real = latency.measure_chains

    def counting(chains, *a, **k):
        measured.extend(chains)
        return real(chains, *a, **k)

    monkeypatch.setattr(latency, "measure_chains", counting)
    return measured


def test_latency_cache_written_and_reused(counted_measure, tmp_path):
    def timed() -> list:
        return [c for c in counted_measure if c != latency.REFERENCE]

    t = latency.conv_latency(8, 16, 3, 1, 12, threads=1)
    assert t > 0 and len(timed()) == 1 and counted_measure.count(latency.REFERENCE) == 1   # beside the reference
    files = list(tmp_path.glob("latency-cpu-1-*.json"))
    assert len(files) == 1 and files[0] == latency.cache_path("cpu", 1)
    assert latency.conv_latency(8, 16, 3, 1, 12, threads=1) == t
    ratio = json.loads(files[0].read_text())["entries"]["hw12:8-16k3s1g1"]
    assert ratio == pytest.approx(t / latency.latency_table("cpu", 1).reference())
    fresh = latency.LatencyTable("cpu", 1)  # a new process reads the ratios back and times the reference only
    assert fresh.conv(8, 16, 3, 1, 12) == pytest.approx(ratio * fresh.reference())
    assert len(timed()) == 1 and counted_measure.count(latency.REFERENCE) == 2
    f = latency.factorized_latency(8, 4, 16, 3, 2, 12, threads=1)
    assert f > 0 and len(timed()) == 2
    assert latency.factorized_latency(8, 4, 16, 3, 2, 12, threads=1) == f
    assert len(timed()) == 2
    entries = json.loads(files[0].read_text())["entries"]
    assert set(entries) == {"hw12:8-16k3s1g1", "hw12:8-4k3s2g1;4-16k1s1g1"}


def test_cached_times_are_relative_to_a_reference_timed_beside_them(monkeypatch, tmp_path):
    """A batch measured under a load that doubles every time reads back as one measured unloaded."""
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))
    load = {"factor": 2.0}
    monkeypatch.setattr(latency, "measure_chains", lambda chains, *a, **k: [
        latency.chain_macs(ch) * 1e-11 * load["factor"] for ch in chains])
    chain = (12, (latency.ConvSpec(8, 16, 3),))
    loaded = latency.LatencyTable("cpu", 5).measure([chain])[0]
    load["factor"] = 1.0
    quiet = latency.LatencyTable("cpu", 5).measure([chain])[0]
    assert quiet == pytest.approx(latency.chain_macs(chain) * 1e-11) and loaded == pytest.approx(2 * quiet)


def test_many_chains_are_timed_in_batches_of_bounded_memory(monkeypatch, tmp_path):
    """Every batch's sessions fit BATCH_BYTES (a chain larger than that alone); each batch is timed
    beside the reference, and every chain ends up in the table, in its own batch's ratio."""
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))
    batches: list = []
    load = iter([1.0, 3.0, 2.0, 5.0, 4.0, 1.5] * 10)   # each batch runs under another load

    def measure(chains, *a, **k):
        batches.append(chains)
        f = next(load)
        return [latency.chain_macs(ch) * 1e-11 * f for ch in chains]

    monkeypatch.setattr(latency, "measure_chains", measure)
    chains = [(hw, (latency.ConvSpec(c, c, 3),)) for hw in (14, 28, 56) for c in (16, 32, 64, 128)]
    chains.append((7, (latency.ConvSpec(2048, 2048, 3),)))   # 150 MB of weights: over any batch
    context = latency._context("cpu")
    monkeypatch.setattr(latency, "BATCH_BYTES", 3 * max(latency.run_bytes(ch, context) for ch in chains[:-1]))
    times = latency.LatencyTable("cpu", 3).measure(chains)
    assert len(batches) > 2 and all(b[-1] == latency.REFERENCE for b in batches)
    assert [ch for b in batches for ch in b[:-1]] == chains
    for b in batches:
        assert len(b) == 2 or sum(latency.run_bytes(ch, context) for ch in b[:-1]) <= latency.BATCH_BYTES
    assert times == pytest.approx([latency.chain_macs(ch) * 1e-11 for ch in chains])


def test_chain_geometry():
    assert latency.chain_macs((12, (latency.ConvSpec(8, 16, 3, 2),))) == 16 * 8 * 9 * 6 * 6
    fact = latency.factorized_chain(8, 4, 16, 3, 1, 10)
    assert latency.chain_macs(fact) == (4 * 8 * 9 + 16 * 4) * 100
    assert latency.chain_macs((10, (latency.ConvSpec(8, 8, 3, 1, 8),))) == 8 * 9 * 100


def test_best_multiple_picks_the_cheap_block(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))

    def fake(penalise):  # latency = MACs × (1.2 where ``penalise(c)``, else 1)
        def measure(chains, *a, **k):
            return [latency.chain_macs(ch) * 1e-11 * (1.2 if penalise(ch[1][0].cin) else 1.0)
                    for ch in chains]
        return measure

    monkeypatch.setattr(latency, "measure_chains", fake(lambda c: c % 16 != 0))
    assert latency.best_multiple("cpu", 3) == 16
    costs = latency.multiple_costs("cpu", 3)
    assert costs[16] == costs[32] == 1.0 and costs[1] > costs[4] > costs[8] > 1.0
    monkeypatch.setattr(latency, "measure_chains", fake(lambda c: False))
    assert latency.best_multiple("cpu", 4) == 1


def test_chain_time_is_between_the_context_convs():
    def k(op, dur):
        return {"name": f"{op}_kernel_time", "dur": dur, "args": {"op_name": op}}

    run = [k("ReorderInput", 5), k("Conv", 7), k("ReorderOutput", 3), k("Conv", 40), k("Conv", 2),
           k("ReorderInput", 4), k("Conv", 11), k("ReorderOutput", 6)]
    assert latency._between_context(run) == pytest.approx((3 + 40 + 2 + 4) / 1e6)


def test_robust_median_ignores_bursts():
    quiet = [1.0, 1.1, 1.0, 1.2]
    burst_in_round = [1.0, 5.0, 1.1, 1.0]  # one run hit by another process
    burst_round = [4.0, 4.5, 5.0, 4.2]  # a whole round hit
    assert latency._robust_median(quiet + burst_in_round + burst_round + quiet + quiet, 4) \
        == pytest.approx(1.0, abs=0.02)


def test_labels_are_unique_and_short(two_models):
    assert benchmark._labels(["a/m.onnx", "b/n.onnx"]) == ["m.onnx", "n.onnx"]
    assert benchmark._labels(["a/m.onnx", "b/m.onnx"]) == ["a/m.onnx", "b/m.onnx"]
    assert benchmark._labels(["a/m.onnx", "a/m.onnx"]) == ["m.onnx", "m.onnx#2"]
    assert benchmark._labels([two_models[0], two_models[0]]) == ["tiny_resnet", "tiny_resnet#2"]


def _cache_keys(folder) -> set[str]:
    files = list(folder.glob("latency-*.json"))
    assert len(files) == 1, files
    return set(json.loads(files[0].read_text())["entries"])


def test_concurrent_compress_runs_keep_both_tables(tmp_path):
    """Two runs started together on a fresh cache both finish, and the cache then holds every
    entry each one measures when it runs alone (the merge happens under a file lock). The width
    multiple is given: measured, it follows the machine's load, and so do the widths timed."""
    import os
    import subprocess
    import sys

    def start(name: str, cache) -> subprocess.Popen:
        model = tmp_path / f"{name}.onnx"
        if not model.exists():
            onnx.save(graphs.GRAPHS[name](13), model)
        env = {**os.environ, "ONNXCC_CACHE": str(cache)}
        return subprocess.Popen([sys.executable, "-m", "onnxcc", "compress", model, "--flops", "0.3", "--steps", "1",
                                 "--tries", "1", "--recover", "none", "--threads", "1", "--round-to", "4",
                                 "-o", tmp_path / f"{name}.{cache.name}.onnx"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(runs: list[subprocess.Popen]) -> None:
        for r in runs:
            out, err = r.communicate(timeout=600)
            assert r.returncode == 0, err

    names = ("tiny_resnet", "tiny_mobilenet")
    finish([start(n, tmp_path / "shared") for n in names])
    alone = {}
    for n in names:
        finish([start(n, tmp_path / f"alone-{n}")])
        alone[n] = _cache_keys(tmp_path / f"alone-{n}")
    assert alone["tiny_resnet"] != alone["tiny_mobilenet"]      # each run adds entries of its own
    assert _cache_keys(tmp_path / "shared") >= alone["tiny_resnet"] | alone["tiny_mobilenet"]


def _save_together(path: str, prefix: str, barrier) -> None:
    """Save 50 entries once, at the same moment as the other process, slowly: the file is read,
    then written 0.3 s later, as on a loaded machine or a network file system."""
    real_read = latency._read_entries

    def slow_read(p: Path) -> dict[str, float]:
        entries = real_read(p)
        time.sleep(0.3)
        return entries

    latency._read_entries = slow_read
    table = latency.LatencyTable("cpu", 1, path=Path(path))
    table.entries.update({f"{prefix}{i}": float(i) for i in range(50)})
    barrier.wait()
    table._save()


def test_cache_merge_loses_nothing_under_contention(tmp_path):
    import multiprocessing

    path = tmp_path / "latency.json"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_save_together, args=(str(path), p, barrier)) for p in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert set(json.loads(path.read_text())["entries"]) == {f"{p}{i}" for p in "ab" for i in range(50)}
