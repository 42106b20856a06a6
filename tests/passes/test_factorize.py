import numpy as np
import pytest

from engine_helpers import normalized_analysis
from graphs import GRAPHS, cases
from oracles import assert_same_outputs, check_model_full, random_feeds, runtime_macs

from onnxcc.passes.factorize import FactorizeConvPass, svd_factors

FACTOR_CASES = [c for c in cases() if c[0] in ("conv_chain", "conv_bn", "tiny_resnet", "tiny_mobilenet",
                                               "pad", "concat", "split", "transpose_nhwc", "se_block")]


@pytest.mark.parametrize("name,opset", FACTOR_CASES)
@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_full_rank_factorization_is_exact(name, opset, method):
    norm, a = normalized_analysis(GRAPHS[name](opset))
    layers = [l for l in a.layers if l.factorizable]
    assert layers
    ranks = {l.key: (min(l.cout, l.cin * l.kk) if method == "svd" else (l.cout, l.cin)) for l in layers}
    res = FactorizeConvPass(ranks, method)(norm)
    check_model_full(res.model)
    assert_same_outputs(norm, res.model, rtol=1e-4, atol=1e-5)
    extra = 1 if method == "svd" else 2
    assert len(res.model.graph.node) == len(norm.graph.node) + extra * len(layers)
    assert res.record.changes == len(layers)


@pytest.mark.parametrize("name", ["conv_chain", "tiny_resnet", "tiny_mobilenet", "concat"])
def test_low_rank_macs_match_cost_model(name):
    norm, a = normalized_analysis(GRAPHS[name](13))
    ranks = {l.key: max(1, l.max_useful_rank() // 2) for l in a.layers if l.factorizable}
    res = FactorizeConvPass(ranks)(norm)
    feeds = random_feeds(norm)
    assert runtime_macs(res.model, feeds) == a.macs(ranks=ranks) < a.total_macs


def test_depthwise_is_never_factorized():
    norm, a = normalized_analysis(GRAPHS["depthwise"](13))
    dw = [l for l in a.layers if l.group > 1]
    assert dw and not any(l.factorizable for l in dw)
    res = FactorizeConvPass({dw[0].key: 1})(norm)
    assert not res.record.modified and "depthwise" in res.record.skipped[dw[0].key]


def test_svd_truncation_is_optimal_in_frobenius_norm():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    A, B = svd_factors(W, 5)
    approx = B.reshape(16, 5) @ A.reshape(5, -1)
    s = np.linalg.svd(W.reshape(16, -1), compute_uv=False)
    assert np.isclose(np.linalg.norm(W.reshape(16, -1) - approx), np.sqrt((s[5:] ** 2).sum()), rtol=1e-4)


def test_whitened_svd_beats_plain_on_correlated_inputs():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((12, 20)).astype(np.float64)
    X = rng.standard_normal((20, 500)) * np.linspace(3, 0.01, 20)[:, None]  # anisotropic data
    L = np.linalg.cholesky(X @ X.T / 500 + 1e-9 * np.eye(20))
    Wt = W.reshape(12, 20, 1, 1)
    err = {}
    for key, wh in (("plain", None), ("whitened", L)):
        A, B = svd_factors(Wt, 4, wh)
        err[key] = np.linalg.norm((W - B.reshape(12, 4) @ A.reshape(4, 20)) @ X)
    assert err["whitened"] < err["plain"]
