"""Post-training recovery: give back, from unlabeled calibration samples, what a cut cost.

:func:`recover` (or :class:`RecoverPass`) takes the compressed model, the original and samples;
it returns the compressed model with new initializer values and a record of every stage.
"""
from .channels import KEY, Kept, channel_map, read_channel_map, with_channel_map
from .pipeline import MIN_SAMPLES, MODES, RecoverPass, RecoverResult, default_seconds, recover, recover_checked, torch_available

__all__ = ["KEY", "Kept", "MIN_SAMPLES", "MODES", "RecoverPass", "RecoverResult", "channel_map", "default_seconds",
           "read_channel_map", "recover", "recover_checked", "torch_available", "with_channel_map"]
