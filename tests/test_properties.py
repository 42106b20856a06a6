"""Property-based: random CNNs built from every supported op family."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_helpers import normalized_analysis, random_keep, zero_reads
from oracles import assert_same_outputs, check_model_full, random_feeds, runtime_macs
from strategies import cnn_models

from onnxcc.passes.factorize import FactorizeConvPass
from onnxcc.passes.prune import PruneChannelsPass


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=cnn_models(), seed=st.integers(0, 2**16), frac=st.floats(0.1, 0.9))
def test_random_cnns_normalize_analyse_prune_factorize(model, seed, frac):
    before = model.SerializeToString()
    feeds = random_feeds(model, seed=seed)
    norm, a = normalized_analysis(model, feeds)
    assert_same_outputs(model, norm, feeds, rtol=1e-4, atol=1e-5)
    assert a.total_macs == runtime_macs(model, feeds)

    keep = random_keep(a, seed=seed, frac=frac)
    pruned = PruneChannelsPass(a, keep)(norm)
    check_model_full(pruned.model)
    assert_same_outputs(zero_reads(a, norm, keep), pruned.model, feeds, rtol=1e-4, atol=1e-5)
    assert runtime_macs(pruned.model, feeds) == pruned.record.macs_after == a.macs(
        {g: int(m.sum()) for g, m in keep.items()})

    full = {l.key: min(l.cout, l.cin * l.kk) for l in a.layers if l.factorizable}
    fact = FactorizeConvPass(full)(norm)
    check_model_full(fact.model)
    assert_same_outputs(norm, fact.model, feeds, rtol=1e-4, atol=1e-5)
    assert model.SerializeToString() == before
