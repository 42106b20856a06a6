"""What a compression run is asked for: its settings and the budget they set."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import UsageError

if TYPE_CHECKING:
    from .search.plan import Plan

Progress = Callable[[str, int, int], None]
EpochReport = Callable[[dict], None]     # one fine-tuning epoch's numbers, as it ends
METHODS = ("cc", "prune", "decompose")
RECOVER_MODES = ("none", "stats", "blocks")
RECOVER_STAGES = ("cut", "statistics", "blocks", "end-to-end")   # in the order recovery runs them
PROVIDERS = ("cpu", "cuda")


@dataclass
class CompressConfig:
    flops: float | None = None         # fraction of MACs to remove
    latency: float | None = None       # or: fraction of the measured latency to remove
    method: str = "cc"
    steps: int | None = None           # multi-step removal; None: 3, fewer where the search would outlast search_seconds
    provider: str = "cpu"
    seed: int = 0
    gamma: float = 0.9                 # weight of the remaining-compression-space look-ahead
    sens_samples: int | None = None    # calibration samples per damage measurement; None: 16, 8 where the
    #                                    steps on 16 would outlast search_seconds (8 is noisier on some models)
    search_seconds: float = 420.0      # what one search should measure for at most (estimated before it starts)
    fractions: tuple[float, ...] = (0.2, 0.45, 0.7, 1.0)  # 1.0: never extrapolate
    # a group keeps at least this fraction of its channels (or is emptied where its branch may be);
    # None: by the target (onnxcc.search.context.keep_floor)
    min_keep: float | None = None
    reconstruct: bool = True           # least-squares refit + activation-aware SVD (beyond CC)
    stat_samples: int = 32             # calibration samples for layer-input statistics
    round_to: int | None = None        # kept widths and ranks are multiples of this; None: measured
    threads: int = 0
    latency_aware: bool = True         # measure layer latencies; never keep a slower factorization
    speed_weight: float = 1.0          # under --flops: worth of a removal's latency share vs its MAC share
    tries: int | None = None           # searches on rotated calibration splits; None: by the model's cost
    recover: str | None = None         # none | stats | blocks; None: blocks where torch is installed
    recover_seconds: float | None = None   # the whole recovery's time; None: by the model's size
    min_fidelity: float | None = None  # refuse to write a model whose held-back cosine is below this
    device: str = "auto"               # where recovery trains: auto | cpu | cuda
    ray_address: str | None = None     # measure on Ray: local | auto | HOST:PORT; None: in this process
    ray_workers: int = 2               # Ray workers (one CPU each) measuring candidates
    memory_check: bool = True          # refuse to start where the estimated peak exceeds the available memory
    # the search's internal thresholds by name (onnxcc.search.SearchTuning's fields): for experiments
    search_overrides: dict[str, float] = field(default_factory=dict)

    @property
    def removal(self) -> float:
        """The fraction the target removes, of the MACs or of the latency."""
        return self.flops if self.flops is not None else self.latency

    def validate(self) -> None:
        if (self.flops is None) == (self.latency is None):
            raise UsageError("give exactly one target: --flops R or --latency R")
        name, r = ("--flops", self.flops) if self.flops is not None else ("--latency", self.latency)
        if not 0 < r < 1:
            raise UsageError(f"{name} must be in (0, 1), got {r}")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError("--round-to must be at least 1")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be at least 1")
        if self.sens_samples is not None and self.sens_samples < 1:
            raise UsageError("sens_samples must be at least 1")
        if self.search_seconds <= 0:
            raise UsageError("--search-time must be positive")
        if self.tries is not None and self.tries < 1:
            raise UsageError("--tries must be at least 1")
        if self.recover not in (None,) + RECOVER_MODES:
            raise UsageError(f"--recover must be one of {', '.join(RECOVER_MODES)}")
        if self.recover_seconds is not None and self.recover_seconds < 0:
            raise UsageError("--recover-time must not be negative")
        if self.ray_workers < 1:
            raise UsageError("--ray-workers must be at least 1")
        if self.min_fidelity is not None and not -1 <= self.min_fidelity <= 1:
            raise UsageError(f"--min-fidelity is a cosine in [-1, 1], got {self.min_fidelity}")


@dataclass
class Budget:
    """What the target limits: MACs (``flops``) or predicted seconds (``latency``)."""

    kind: str                                          # "flops" | "latency"
    fraction: float                                    # share of ``total`` to remove
    total: float                                       # cost of the unmodified model
    cost: Callable[[dict[int, int], dict[str, int]], float]   # (kept, ranks) -> cost

    def target(self, share: float = 1.0) -> float:
        return self.total * (1 - self.fraction * share)

    def of(self, plan: Plan) -> float:
        return self.cost(plan.kept(), plan.ranks)


OPTIMIZERS = ("adam", "sgd")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FinetuneConfig:
    """How a compressed model is distilled from its original (``onnxcc finetune``, ``--finetune``)."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32               # the global batch: split across torchrun's processes
    optimizer: str = "adam"
    temperature: float = 4.0
    alpha: float = 0.5                 # weight of distillation against cross-entropy on labels
    warmup: float = 0.03               # share of the steps with a linear learning-rate warm-up
    augment: bool = True               # random resized crops and flips of image inputs
    batchnorm: bool = False            # train with BatchNorm re-inserted after each Conv, folded back after
    device: str = "auto"
    amp: bool = True                   # bfloat16 autocast on a CUDA device that supports it
    workers: int | None = None         # DataLoader worker processes; None: by the data source
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise UsageError(f"need lr > 0, temperature > 0 and alpha in [0, 1]; got {self.lr}, "
                             f"{self.temperature}, {self.alpha}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown device {self.device!r}; use auto, cpu or cuda")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; use {' or '.join(OPTIMIZERS)}")
        if self.workers is not None and self.workers < 0:
            raise UsageError("--workers must not be negative")
