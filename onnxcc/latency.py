"""Conv latency as onnxruntime really runs it on this machine, for candidate widths and ranks.

MACs are a poor proxy for latency: onnxruntime's CPU Convs run in an NCHWc layout blocked by 8
(AVX2) or 16 (AVX-512) channels when the width is a multiple of 4, padding the rest of the last
block, and in plain NCHW otherwise. So here (AVX-512) 100 channels cost as much as 112, and 93 more
than 96. Candidates are timed as tiny models of one Conv (or, for an SVD pair, two), inside a
network-like context and interleaved in rounds like :mod:`onnxcc.benchmark` (see
:func:`measure_chains`); each median, relative to a reference Conv timed beside it, is cached in a JSON file per provider, thread count and
machine, so a table of ~50 candidates is measured once (about 8 s on 2 cores) and then read back.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import platformdirs
from filelock import FileLock
from onnx import TensorProto, helper, numpy_helper

from .benchmark import read_trace, split_runs
from .io import atomic_write_text
from .runtime import _ort, make_session, providers_for

MULTIPLES = (1, 4, 8, 16, 32)
_CACHE_VERSION = 3  # bump whenever the measurement method changes: old numbers are not comparable (3: ratios to REFERENCE)
_CONTEXT = 16  # channels of the context Convs: a multiple of every NCHWc block size


Pair = int | tuple[int, int]


class ConvSpec(NamedTuple):
    """One Conv of a chain; ``k`` and ``stride`` are an int (square) or (height, width)."""

    cin: int
    cout: int
    k: Pair
    stride: Pair = 1
    group: int = 1


# A measurable request: input size (an int for square inputs, else (height, width)) and the Conv
# layers applied in sequence.
Chain = tuple[Pair, tuple[ConvSpec, ...]]

# What every cached time is relative to: a mid-network 3x3 Conv, timed beside each batch
REFERENCE: Chain = ((28, 28), (ConvSpec(64, 64, 3),))
# What the sessions of one interleaved batch may hold (see :func:`run_bytes`): every chain of a
# batch keeps its session, weights and buffers until the batch is timed, and a large network asks
# for hundreds of chains (open-nsfw: 283, 1.5 GB in one batch)
BATCH_BYTES = 256 << 20
SESSION_BYTES = 2 << 20   # what an onnxruntime session holds however small its model


def _pair(v: Pair) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _fmt(v: Pair) -> str:
    h, w = _pair(v)
    return str(h) if h == w else f"{h}x{w}"


def chain_key(chain: Chain) -> str:
    hw, layers = chain
    return f"hw{_fmt(hw)}:" + ";".join(f"{c.cin}-{c.cout}k{_fmt(c.k)}s{_fmt(c.stride)}g{c.group}" for c in layers)


def chain_macs(chain: Chain) -> int:
    hw, layers = chain
    total = 0
    for c in layers:
        hw = _out_size(hw, c.k, c.stride)
        kh, kw = _pair(c.k)
        total += c.cout * (c.cin // c.group) * kh * kw * hw[0] * hw[1]
    return total


def cache_dir() -> Path:
    """``$ONNXCC_CACHE``, else the platform's user cache folder (``~/.cache/onnxcc`` on Linux)."""
    env = os.environ.get("ONNXCC_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("onnxcc", appauthor=False))


def cache_path(provider: str = "cpu", threads: int = 2) -> Path:
    return cache_dir() / f"latency-{provider}-{threads}-{machine_hash(provider)}.json"


def machine_hash(provider: str = "cpu") -> str:
    """Hash of what decides kernel speed: CPU model and vector ISA, GPU, onnxruntime version."""
    blob = json.dumps(machine_info(provider), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


class LatencyTable:
    """Measured latencies (seconds) backed by one cache file; measures only what is missing.

    The file holds each chain's time relative to :data:`REFERENCE`, a Conv timed in the same
    interleaved run: a load that slows the machine while a batch is measured (another compress
    run, a test suite) slows the reference alike, so batches measured at different times and
    loads stay comparable. Seconds are those ratios times the reference as timed in this process.
    """

    def __init__(self, provider: str = "cpu", threads: int = 2, path: Path | None = None,
                 budget_s: float = 0.06):
        providers_for(provider)  # refuse cuda without CUDA before any measurement
        self.provider, self.threads, self.budget_s = provider, threads, budget_s
        self.path = path or cache_path(provider, threads)
        self.entries: dict[str, float] = _read_entries(self.path)
        self._reference: float | None = None

    def measure(self, chains: list[Chain]) -> list[float]:
        """Latency per chain; the uncached ones are timed in batches of bounded memory, each
        interleaved with the reference, and saved batch by batch."""
        missing = list(dict.fromkeys(ch for ch in chains if chain_key(ch) not in self.entries))
        for batch in _batches(missing, _context(self.provider)):
            *times, ref = measure_chains(batch + [REFERENCE], self.provider, self.threads, self.budget_s)
            self.entries.update({chain_key(ch): t / ref for ch, t in zip(batch, times)})
            self._reference = self._reference or ref
            self._save()
        ref = self.reference()
        return [self.entries[chain_key(ch)] * ref for ch in chains]

    def pin_reference(self, seconds: float) -> None:
        """Price with ``seconds`` for the reference (a resumed run prices as the killed one did)."""
        self._reference = seconds

    def reference(self) -> float:
        """Seconds of :data:`REFERENCE` here and now (timed once per table)."""
        if self._reference is None:
            self._reference = measure_chains([REFERENCE], self.provider, self.threads, self.budget_s)[0]
        return self._reference

    def conv(self, cin: int, cout: int, k: int, stride: int, hw_in: int, group: int = 1) -> float:
        return self.measure([(hw_in, (ConvSpec(cin, cout, k, stride, group),))])[0]

    def factorized(self, cin: int, r: int, cout: int, k: int, stride: int, hw: int) -> float:
        """k×k Cin→r then 1×1 r→Cout, timed as one model so the rank-r tensor stays blocked."""
        return self.measure([factorized_chain(cin, r, cout, k, stride, hw)])[0]

    def _save(self) -> None:
        # Other runs may be measuring into the same file: the read-merge-replace happens under a
        # lock so that no run's entries are lost, and the replace is atomic for lock-free readers.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.path}.lock"):
            self.entries = {**_read_entries(self.path), **self.entries}
            doc = {"version": _CACHE_VERSION, "provider": self.provider, "threads": self.threads,
                   "machine": machine_info(self.provider), "entries": self.entries}
            atomic_write_text(self.path, json.dumps(doc, indent=0, sort_keys=True))


def _context(provider: str) -> int:
    """Channels of the context Convs a chain is timed between: on CPU only (see :func:`measure_chains`)."""
    return _CONTEXT if provider == "cpu" else 0


def _batches(chains: list[Chain], context: int) -> list[list[Chain]]:
    """``chains`` in order, cut into batches whose sessions hold at most BATCH_BYTES together
    (a chain larger than that alone)."""
    out: list[list[Chain]] = []
    held = 0
    for ch in chains:
        size = run_bytes(ch, context)
        if not out or held + size > BATCH_BYTES:
            out.append([])
            held = 0
        out[-1].append(ch)
        held += size
    return out


def run_bytes(chain: Chain, context: int = 0) -> int:
    """What a session timing ``chain`` holds, about (measured on CPU sessions from 7x7x16 to
    14x14x512): a fixed part, its weights four times (the model's, the session's, the pre-packed
    copy) and its activations twice (blocked-layout copies and the arena's slack)."""
    hw, layers = _pair(chain[0]), _with_context(chain[1], context)
    weights, elements = 0, layers[0].cin * hw[0] * hw[1]
    for c in layers:
        k = _pair(c.k)
        weights += c.cout * (c.cin // c.group) * k[0] * k[1]
        hw = _out_size(hw, c.k, c.stride)
        elements += c.cout * hw[0] * hw[1]
    return SESSION_BYTES + 4 * (4 * weights + 2 * elements)


def _with_context(layers: tuple[ConvSpec, ...], context: int) -> tuple[ConvSpec, ...]:
    """``layers`` between a 1x1 Conv from and a 1x1 Conv to ``context`` channels (none for 0)."""
    if not context:
        return tuple(layers)
    return (ConvSpec(context, layers[0].cin, 1),) + tuple(layers) + (ConvSpec(layers[-1].cout, context, 1),)


def factorized_chain(cin: int, r: int, cout: int, k: int, stride: int, hw: int) -> Chain:
    return (hw, (ConvSpec(cin, r, k, stride), ConvSpec(r, cout, 1, 1)))


_tables: dict[Path, LatencyTable] = {}


def latency_table(provider: str = "cpu", threads: int = 2) -> LatencyTable:
    """The shared table of this provider/thread count (re-created when $ONNXCC_CACHE changes)."""
    path = cache_path(provider, threads)
    if path not in _tables:
        _tables[path] = LatencyTable(provider, threads, path)
    return _tables[path]


def conv_latency(cin: int, cout: int, k: int, stride: int, hw_in: int, group: int = 1,
                 provider: str = "cpu", threads: int = 2) -> float:
    """Seconds of one Conv (bias, pads k//2) on a (1, cin, hw_in, hw_in) input, in a network."""
    return latency_table(provider, threads).conv(cin, cout, k, stride, hw_in, group)


def factorized_latency(cin: int, r: int, cout: int, k: int, stride: int, hw: int,
                       provider: str = "cpu", threads: int = 2) -> float:
    """Seconds of the SVD pair replacing a k×k Cin→Cout Conv at rank r, in a network."""
    return latency_table(provider, threads).factorized(cin, r, cout, k, stride, hw)


# Widths in 64..128 by their largest divisor among MULTIPLES ("1" = not a multiple of 4), each
# class spread over the whole range because per-MAC speed also grows with layer size.
_PROBE_COUNTS = {1: (70, 83, 97, 115), 4: (68, 84, 100, 116), 8: (72, 88, 104, 120),
                 16: (80, 112), 32: (64, 96, 128)}
_PROBE_SHAPES = ((28, 3), (28, 1))  # (hw, k): a mid-network 3x3 and 1x1 Conv


def multiple_costs(provider: str = "cpu", threads: int = 2) -> dict[int, float]:
    """Relative seconds per MAC of a width drawn uniformly from the multiples of each m
    (1.0 = the cheapest m), for Cin = Cout Convs of the probe shapes."""
    table = latency_table(provider, threads)
    probes = [(m, (hw, (ConvSpec(c, c, k),))) for hw, k in _PROBE_SHAPES
              for m, counts in _PROBE_COUNTS.items() for c in counts]
    per_mac = [t / chain_macs(ch) for (_, ch), t in zip(probes, table.measure([ch for _, ch in probes]))]
    exact: dict[int, list[float]] = {m: [] for m in _PROBE_COUNTS}
    n = len(probes) // len(_PROBE_SHAPES)
    for i in range(0, len(probes), n):
        ref = float(np.median(per_mac[i:i + n]))  # each shape relative to itself: both weigh alike
        for (m, _), v in zip(probes[i:i + n], per_mac[i:i + n]):
            exact[m].append(v / ref)
    cls = {m: float(np.mean(v)) for m, v in exact.items()}
    costs = {m: sum(_share(m, e) * cls[e] for e in MULTIPLES) for m in MULTIPLES}
    best = min(costs.values())
    return {m: round(c / best, 4) for m, c in costs.items()}


def _share(m: int, e: int) -> float:
    """Fraction of the multiples of ``m`` whose largest divisor among MULTIPLES is ``e``."""
    if e < m:
        return 0.0
    nxt = next((x for x in MULTIPLES if x > e), None)
    return m / e - (m / nxt if nxt else 0.0)


def best_multiple(provider: str = "cpu", threads: int = 2, tolerance: float = 0.05) -> int:
    """Smallest channel multiple whose per-MAC cost is within ``tolerance`` of the cheapest one:
    rounding widths to it captures the blocked-layout speed-up without wasting channels.

    The tolerance is loose on purpose: a coarser multiple must be clearly cheaper to pay for its
    coarser steps (with 2 threads, multiples of 32 split into an even number of 16-channel blocks
    and measure ~4% cheaper per MAC than other multiples of 16 on AVX-512, not worth the steps).
    """
    costs = multiple_costs(provider, threads)
    return min(m for m, c in costs.items() if c <= 1 + tolerance)


def measure_chains(chains: list[Chain], provider: str = "cpu", threads: int = 2,
                   budget_s: float = 0.06, rounds: int = 8) -> list[float]:
    """Seconds per chain, uncached. Each chain gets about ``budget_s`` of timed runs, spread
    over ``rounds`` rounds that visit every chain in turn, so drift hits all alike; the result
    is a low percentile over rounds of a low percentile within each (see :func:`_robust_median`).

    On CPU a chain is timed as it costs inside a network: it runs between two fixed 1x1 Convs
    and its time is the sum of the profiled kernels between them, i.e. its Convs plus the NCHWc
    Reorders its widths force. Timing a lone Conv instead would charge every multiple-of-4 width
    the Reorder of the model's input and output (up to 40% of a 1x1 Conv) that a network pays
    once, and make unaligned widths, which run without the blocked layout, look cheaper than
    they are. CUDA kernels run asynchronously, so there whole runs of the bare chain are timed.
    """
    context = _context(provider)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="onnxcc-latency-") as tmp:
        sessions, feeds = [], []
        for i, ch in enumerate(chains):
            model = _chain_model(ch, rng, context=context)
            sessions.append(make_session(model, provider, threads, profile_prefix=f"{tmp}/p{i}") if context
                            else make_session(model, provider, threads))
            cin = context or ch[1][0].cin
            feeds.append({"x": rng.standard_normal((1, cin, *_pair(ch[0]))).astype(np.float32)})
        per_round = []
        for sess, f in zip(sessions, feeds):
            sess.run(None, f)  # first run allocates and pre-packs weights
            est = min(_timed(sess, f) for _ in range(2))
            per_round.append(int(np.clip(budget_s / rounds / max(est, 1e-6), 1, 40)))
        samples: list[list[float]] = [[] for _ in chains]
        for _ in range(rounds):
            for sess, f, n, s in zip(sessions, feeds, per_round, samples):
                s.extend(_timed(sess, f) for _ in range(n))
        if context:
            # the trace starts at session creation: drop the warm-up and the two estimate runs
            samples = [[_between_context(run) for run in split_runs(read_trace(sess))[3:]]
                       for sess in sessions]
    return [_robust_median(s, n) for s, n in zip(samples, per_round)]


def _robust_median(samples: list[float], per_round: int) -> float:
    """25th percentile over rounds of each round's 20th percentile. Other processes only ever
    add time, in bursts (and a non-spinning worker thread that finds no free core turns a run
    into a one-thread run, twice as slow): the low percentile drops the runs a burst hit within
    a round, the one across rounds drops rounds that a long burst covered entirely — one chain
    can be the reference of a whole site in the latency model, so a median is not enough."""
    rounds = [samples[i:i + per_round] for i in range(0, len(samples), per_round)]
    return float(np.percentile([np.percentile(r, 20) for r in rounds], 25))


def _between_context(run: list[dict]) -> float:
    """Seconds of the kernels between the first and the last Conv (the two context Convs)."""
    convs = [i for i, e in enumerate(run) if e.get("args", {}).get("op_name") == "Conv"]
    return sum(e["dur"] for e in run[convs[0] + 1:convs[-1]]) / 1e6


def _timed(sess, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    sess.run(None, feeds)
    return time.perf_counter() - t0


def _out_size(hw: Pair, k: Pair, stride: Pair) -> tuple[int, int]:
    return tuple((n + 2 * (kk // 2) - kk) // s + 1 for n, kk, s in zip(_pair(hw), _pair(k), _pair(stride)))


def _chain_model(chain: Chain, rng: np.random.Generator, context: int = 0) -> onnx.ModelProto:
    """The chain's Convs (bias, pads k//2); with ``context`` > 0 between a 1x1 Conv from and a
    1x1 Conv to ``context`` channels."""
    hw, layers = _pair(chain[0]), _with_context(chain[1], context)
    nodes, inits, x = [], [], "x"
    for i, c in enumerate(layers):
        k = _pair(c.k)
        # N(0, 1/fan_in) weights keep activations O(1): no denormals to slow the kernels down
        w = (rng.standard_normal((c.cout, c.cin // c.group) + k)
             / np.sqrt(c.cin // c.group * k[0] * k[1])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(c.cout, np.float32), f"b{i}")]
        y = f"y{i}"
        pads = [k[0] // 2, k[1] // 2] * 2
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], kernel_shape=list(k),
                                      strides=list(_pair(c.stride)), pads=pads, group=c.group))
        x, hw = y, _out_size(hw, c.k, c.stride)
    graph = helper.make_graph(
        nodes, "latency_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layers[0].cin, *_pair(chain[0])])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, layers[-1].cout, *hw])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _read_entries(path: Path) -> dict[str, float]:
    """Cached entries, or none when the file is absent, unreadable or of another version."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION:
        return {}
    return {k: float(v) for k, v in doc.get("entries", {}).items()}


@functools.lru_cache(maxsize=None)
def machine_info(provider: str) -> dict:
    info = {"onnxruntime": _ort().__version__, "machine": platform.machine(),
            "cpu": platform.processor()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["cpu"] = value.strip()
        elif key.strip() == "flags":
            # the vector ISA picks the NCHWc block size and the GEMM kernels
            info["isa"] = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma")))
            break
    if provider == "cuda":
        info["gpu"] = sorted(p.read_text() for p in Path("/proc/driver/nvidia/gpus").glob("*/information"))
    return info
