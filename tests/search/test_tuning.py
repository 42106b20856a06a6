"""SearchTuning: what a search takes from the config, and the channel floor the target sets."""
import pytest

from onnxcc.config import CompressConfig
from onnxcc.errors import UsageError
from onnxcc.search import SearchTuning
from onnxcc.search.context import keep_floor


@pytest.mark.parametrize("fraction, floor", [(0.1, 0.5), (0.3, 0.5), (0.5, 0.5), (0.6, 0.4), (0.7, 0.3), (0.8, 0.25)])
def test_the_channel_floor_is_a_half_and_less_only_for_the_deepest_cuts(fraction, floor):
    assert keep_floor(fraction) == pytest.approx(floor)


def test_a_floor_the_user_sets_wins_over_the_targets():
    assert SearchTuning.of(CompressConfig(flops=0.3)).min_keep == pytest.approx(0.5)
    assert SearchTuning.of(CompressConfig(latency=0.7)).min_keep == pytest.approx(0.3)
    assert SearchTuning.of(CompressConfig(flops=0.3, min_keep=0.1)).min_keep == 0.1


def test_overrides_change_thresholds_by_name_and_refuse_unknown_ones():
    assert SearchTuning.of(CompressConfig(flops=0.3, search_overrides={"compounding": 5.0})).compounding == 5.0
    with pytest.raises(UsageError, match="nonsense"):
        SearchTuning.of(CompressConfig(flops=0.3, search_overrides={"nonsense": 1.0}))
    with pytest.raises(UsageError, match="min_keep"):   # a config setting is set on the config
        SearchTuning.of(CompressConfig(flops=0.3, search_overrides={"min_keep": 0.1}))
