"""Errors a user can cause (one line, exit code 2 in the CLI) versus bugs (keep their traceback).

Everything a user can trigger — a bad file, an unsupported model, an unreachable target — derives
from :class:`OnnxccError`. Pass contract violations are bugs and deliberately sit outside it.
"""
from __future__ import annotations


class OnnxccError(Exception):
    """Base class of every error caused by the user's input; the CLI prints it as one line."""


class ModelLoadError(OnnxccError):
    """The model file is missing, empty, truncated or not ONNX."""


class UnsupportedModelError(OnnxccError):
    """The model is valid ONNX but onnxcc cannot work on it (no Conv, quantized, ...)."""


class InputShapeError(OnnxccError):
    """An input shape is missing, dynamic without a pin, or malformed."""


class CalibrationError(OnnxccError):
    """Calibration data is missing, of the wrong shape or holds NaN/Inf."""


class TargetUnreachableError(OnnxccError):
    """The requested compression cannot be reached on this model."""


class UsageError(OnnxccError):
    """Arguments that contradict each other or the file system (output path, rates, ...)."""


class FidelityError(OnnxccError):
    """The compressed model is less faithful than the user allowed (--min-fidelity)."""


class VerificationError(OnnxccError):
    """An emitted model failed its checks (checker, onnxruntime run, shapes)."""


class PassContractError(RuntimeError):
    """A pass broke its pre- or postcondition: a bug in onnxcc, never the user's fault."""


class ResourceError(OnnxccError):
    """The machine cannot hold what the run needs (estimated before it starts)."""
