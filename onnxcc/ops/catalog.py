"""The plain facts about ops, in one place; behaviour is registered by the modules that own it.

Each op appears in as many lines as it has facts; :meth:`OpRegistry.declare` refuses a fact
stated twice.
"""
from __future__ import annotations

from .registry import Liveness, OpRegistry, OutputKind


def declare_facts(ops: OpRegistry) -> None:
    """Declare every fact into ``ops`` (the package does, once, into :data:`OPS`)."""
    # ---- families: ops one channel rule treats alike ---------------------------------------------
    ops.declare("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Elu", "Selu",
                "Celu", "Softplus", "Softsign", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Floor",
                "Ceil", "Round", "Mish", "Gelu", "Cast", "Identity", "Dropout", "ThresholdedRelu", "Sign",
                "Sin", "Cos", "Not", "IsNaN", "IsInf",
                family="unary", liveness=Liveness.UNIFORM)
    ops.declare("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                family="pool")
    ops.declare("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Clip",
                "Where", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or",
                "Xor", "Mod", "BitShift",
                family="elementwise")
    ops.declare("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
                "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
                family="reduce")

    # ---- weight layers: MACs are counted on these alone (as ptflops/fvcore/Torch-Pruning do) -----
    ops.declare("Conv", layer=True, fold_axis=0, weights=(1, 2))
    ops.declare("ConvTranspose", layer=True, fold_axis=1, weights=(1, 2))
    ops.declare("Gemm", layer=True, fold_axis=1, weights=(0, 1, 2))   # fold_axis with transB=0; transB swaps it
    ops.declare("MatMul", layer=True, weights=(0, 1))

    # ---- other learned weights -------------------------------------------------------------------
    ops.declare("BatchNormalization", "InstanceNormalization", weights=(1, 2))
    ops.declare("PRelu", weights=(1,))
    # a constant added or multiplied is a learned shift or scale only when it is one per channel
    ops.declare("Add", "Mul", weights=(0, 1), per_channel_weights=True)

    # ---- liveness: where the constant left by an emptied channel group may pass and end ----------
    ops.declare("Pow", "PRelu", "Clip", "BatchNormalization", "GlobalAveragePool", "GlobalMaxPool",
                liveness=Liveness.UNIFORM)
    ops.declare("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", liveness=Liveness.JOIN)

    # ---- graph outputs: what an output behind these ops is judged by -----------------------------
    ops.declare("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast",
                output=OutputKind.PASSES)
    ops.declare("Sigmoid", output=OutputKind.SQUASHES)
    ops.declare("Softmax", "LogSoftmax", "ArgMax", "ArgMin", output=OutputKind.CLASSIFIES)

    # ---- shape computations: what follows from these alone is the same for every sample ---------
    ops.declare("Shape", "Size", reads_shape=True)

    # ---- normalization removes these (Dropout only while its mask is unread) ---------------------
    ops.declare("Identity", "Dropout", identity=True)

    # ---- quantized models: onnxcc compresses and fine-tunes the float model ----------------------
    ops.declare("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "DequantizeLinear",
                "QuantizeLinear", "DynamicQuantizeLinear",
                quantized=True, not_trainable="integer quantized op: fine-tune the float model, then quantize")
