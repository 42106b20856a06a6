"""onnxruntime sessions configured the way every part of onnxcc needs them."""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import onnx

from .errors import UsageError

log = logging.getLogger(__name__)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - depends on the install
        raise UsageError("onnxruntime is not installed: pip install 'onnxcc[cpu]' "
                         "(or 'onnxcc[gpu]' for CUDA)") from None
    ort.set_default_logger_severity(3)
    return ort


def providers_for(provider: str) -> list:
    """Map 'cpu' / 'cuda' / 'cuda:N' (GPU N) to onnxruntime provider lists; CUDA must really be present."""
    ort = _ort()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    kind, _, index = provider.partition(":")
    if kind == "cuda" and (not index or index.isdigit()):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError("--provider cuda: onnxruntime has no CUDA execution provider here "
                             "(install 'onnxcc[gpu]' on a machine with an NVIDIA GPU)")
        cuda = ("CUDAExecutionProvider", {"device_id": int(index)}) if index else "CUDAExecutionProvider"
        return [cuda, "CPUExecutionProvider"]
    raise UsageError(f"unknown provider {provider!r}; use cpu or cuda")


def make_session(model: onnx.ModelProto | bytes, provider: str = "cpu", threads: int = 0,
                 optimize: str = "all", profile_prefix: str | None = None, arena: bool = True):
    """A session whose idle threads do not spin, so interleaved sessions do not steal cores.

    ``optimize``: onnxruntime's graph optimisation level, "all", "extended" or "none". With
    ``profile_prefix`` onnxruntime's profiler writes its trace there. Without ``arena`` memory
    goes back after each run instead of staying with the session (for many live sessions)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimize]
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=providers_for(provider))


def quiet_run():
    """Run options under which a failing run raises without onnxruntime logging the error."""
    ro = _ort().RunOptions()
    ro.log_severity_level = 4
    return ro


def expose_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the named intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n and n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return m


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu",
        threads: int = 0) -> dict[str, np.ndarray]:
    sess = make_session(model, provider, threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))
