"""What outputs are judged by: logits behind Softmax/ArgMax, standardised dense channels."""
import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcc.outputs import Standardizer, compare, targets


def _chain(ops: list[tuple[str, dict]], out_type=TensorProto.FLOAT) -> onnx.ModelProto:
    nodes, prev = [], "x"
    for i, (op, attrs) in enumerate(ops):
        extra = [f"shape{i}"] if op == "Reshape" else []
        nodes.append(helper.make_node(op, [prev] + extra, [f"t{i}"], **attrs))
        prev = f"t{i}"
    inits = [helper.make_tensor(f"shape{i}", TensorProto.INT64, [2], [1, -1])
             for i, (op, _) in enumerate(ops) if op == "Reshape"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                          [helper.make_tensor_value_info(prev, out_type, None)], inits)
    return helper.make_model(g)


def test_softmax_output_is_judged_on_its_logits():
    (t,) = targets(_chain([("Relu", {}), ("Softmax", {"axis": 1})]))
    assert (t.tensor, t.output, t.classifier) == ("t0", "t1", True)


def test_argmax_behind_a_reshape_is_peeled_to_the_scores():
    m = _chain([("Relu", {}), ("ArgMax", {"axis": 1}), ("Reshape", {})], TensorProto.INT64)
    (t,) = targets(m)
    assert (t.tensor, t.output, t.classifier) == ("t0", "t2", True)


def test_plain_output_is_itself():
    (t,) = targets(_chain([("Relu", {})]))
    assert (t.tensor, t.classifier) == ("t0", False)


def test_dense_channels_are_standardised_so_small_scores_count():
    rng = np.random.default_rng(0)
    ref = np.concatenate([rng.normal(300, 100, (4, 4, 50)),     # box coordinates, pixels
                          rng.uniform(0, 1, (4, 3, 50))], 1)     # class scores
    ruined = ref.copy()
    ruined[:, 4:] = rng.uniform(0, 1, (4, 3, 50))               # scores replaced by noise
    std = Standardizer(ref)
    raw = float(np.sum((ruined - ref) ** 2) / np.sum(ref ** 2))
    assert raw < 1e-4                                             # what an unscaled error would say
    assert std.relative_error(ruined) > 0.2
    assert compare(ref, ruined, targets(_chain([("Relu", {})]))[0])["cosine_mean"] < 0.8


def test_classifier_agreement_only_for_classifiers():
    ref = np.eye(4)[[0, 1, 2, 3]] + 0.1
    out = np.eye(4)[[0, 1, 3, 3]] + 0.1
    box = targets(_chain([("Relu", {})]))[0]
    cls = targets(_chain([("Relu", {}), ("Softmax", {"axis": 1})]))[0]
    assert "top1_agreement" not in compare(ref, out, box)
    assert compare(ref, out, cls)["top1_agreement"] == 0.75
