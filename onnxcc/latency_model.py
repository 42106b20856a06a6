"""Predicted latency of an analysed network under any plan (kept channels per group, ranks).

Each 2-D Conv is priced by the per-MAC speed onnxruntime reaches at its *site* (kernel, stride,
input size, depthwise or dense) and widths, measured with :mod:`onnxcc.latency` on a grid of
widths — the layer's own and the powers of two down to the narrowest a plan can reach — and
interpolated bilinearly in log-width. Per-MAC speed varies smoothly along the multiples of the
backend's block size, which is all a plan keeps (``round_to``), so a few points per site price
every candidate; the grid and the cache make the table cost seconds once per machine.

An SVD pair costs its k×k Cin→r Conv at the site plus the 1×1 r→Cout Conv at the output size,
times a correction measured on the real pair at the layer's own widths for a few ranks.
Gemm/MatMul, ConvTranspose, grouped and non-2-D Convs are priced at the median per-MAC speed of
the measured Convs (they are a small share of a CNN's time); ops without MACs are a constant
that :func:`calibrate` estimates from one measurement of the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .analysis.groups import Analysis, Layer
from .latency import Chain, ConvSpec, LatencyTable, chain_macs

Progress = Callable[[str, int, int], None]

# Dense Convs are measured down to this width: plans reach below the backend's block on finer
# grids, where a Conv's time stops falling with its width (open-nsfw, 1×1 8→304: 0.054 ms against
# 0.041 ms at 16→304), and per-MAC speed held from the block width down would price it at 0.008 ms
# — making a bottleneck cut to 8 channels look nearly as fast as one emptied.
NARROWEST = 4


@dataclass(frozen=True)
class Site:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    size: tuple[int, int]     # input height, width
    depthwise: bool

    def chain(self, cin: int, cout: int) -> Chain:
        group = cin if self.depthwise else 1
        return (self.size, (ConvSpec(cin, cout, self.kernel, self.stride, group),))

    def out(self) -> "Site":
        """The 1×1 site at this site's output size (where an SVD pair's second Conv runs)."""
        size = tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(self.size, self.kernel, self.stride))
        return Site((1, 1), (1, 1), size, False)


def axis_grid(lo: int, hi: int) -> list[int]:
    """``lo``, ``hi`` and the powers of two between them."""
    lo, hi = max(1, min(lo, hi)), max(lo, hi)
    return sorted({lo, hi} | {1 << j for j in range(hi.bit_length()) if lo < (1 << j) < hi})


class _Surface:
    """Per-MAC seconds at any (cin, cout) of a site from two measured lines through the widest
    point: e(ci, co) ≈ e(ci, C)·e(Ci, co)/e(Ci, C). Narrow inputs (less reduction work per
    output) and narrow outputs (fewer output blocks to spread over threads) slow a Conv down
    roughly independently, and the separable form needs |cins| + |couts| measurements instead
    of their product. Linear in log-width between points, clamped at the ends."""

    def __init__(self, cins: list[int], along_in: list[float], couts: list[int], along_out: list[float]):
        self.x, self.fx = np.log2(cins), np.asarray(along_in)
        self.y, self.fy = np.log2(couts), np.asarray(along_out)
        self.corner = float(self.fx[-1])

    def __call__(self, cin: float, cout: float) -> float:
        e_in = float(np.interp(np.log2(cin), self.x, self.fx))
        e_out = float(np.interp(np.log2(cout), self.y, self.fy))
        return e_in * e_out / self.corner if self.corner > 0 else 0.0


class LatencyModel:
    """Seconds of every MAC layer under a plan, from a measured :class:`LatencyTable`."""

    def __init__(self, analysis: Analysis, table: LatencyTable, round_to: int = 16,
                 progress: Progress | None = None):
        self.analysis = analysis
        self.sites: dict[str, Site] = {}
        axes: dict[Site, tuple[set[int], set[int]]] = {}

        pairs: dict[str, list[tuple[int, Chain]]] = {}   # layer key -> (rank, SVD pair chain)

        def want(site: Site, cins: list[int], couts: list[int]) -> None:
            a = axes.setdefault(site, (set(), set()))
            a[0].update(cins)
            a[1].update(couts if not site.depthwise else cins)

        for layer in analysis.layers:
            site = _site(layer)
            if site is None:
                continue
            self.sites[layer.key] = site
            narrowest = round_to if site.depthwise else min(round_to, NARROWEST)
            lo_in = min(layer.cin, narrowest) if layer.in_groups or site.depthwise else layer.cin
            lo_out = min(layer.cout, narrowest) if layer.out_groups else layer.cout
            want(site, axis_grid(lo_in, layer.cin), axis_grid(lo_out, layer.cout))
            if layer.factorizable:
                ranks = axis_grid(min(round_to, layer.max_useful_rank()), layer.max_useful_rank())
                want(site, [], ranks)
                want(site.out(), ranks, axis_grid(lo_out, layer.cout))
                pairs[layer.key] = [(r, (site.size, (ConvSpec(layer.cin, r, site.kernel, site.stride),
                                                     ConvSpec(r, layer.cout, 1, 1)))) for r in ranks]
        # an emptied branch leaves its join as a 1×1 depthwise Conv (``x + c``): priced as one
        self.join_sites: dict[str, Site] = {}
        for j in analysis.possible_unit_convs():
            c, h, w = analysis.view.shape(j)[1:]
            self.join_sites[j] = Site((1, 1), (1, 1), (h, w), True)
            want(self.join_sites[j], axis_grid(min(c, round_to), c), [])
        lines = {site: (sorted(cins), sorted(couts)) for site, (cins, couts) in axes.items()}
        requests = list(dict.fromkeys(
            (site, ci, co) for site, (cins, couts) in lines.items()
            for ci, co in ([(c, c) for c in cins] if site.depthwise else
                           [(c, couts[-1]) for c in cins] + [(cins[-1], c) for c in couts])))
        if progress:
            progress("measuring layer latencies", 0, 1)
        pair_chains = [ch for rs in pairs.values() for _, ch in rs]
        measured = table.measure([s.chain(ci, co) for s, ci, co in requests] + pair_chains)
        times, pair_times = measured[:len(requests)], iter(measured[len(requests):])
        if progress:
            progress("measuring layer latencies", 1, 1)
        per_mac = {(s, ci, co): t / max(chain_macs(s.chain(ci, co)), 1) for (s, ci, co), t in zip(requests, times)}
        self.surfaces: dict[Site, _Surface] = {}
        for site, (cins, couts) in lines.items():
            if site.depthwise:
                line = [per_mac[(site, c, c)] for c in cins]
                self.surfaces[site] = _Surface(cins, line, [cins[-1]], [line[-1]])
            else:
                self.surfaces[site] = _Surface(cins, [per_mac[(site, c, couts[-1])] for c in cins],
                                               couts, [per_mac[(site, cins[-1], c)] for c in couts])
        self.fallback = float(np.median(list(per_mac.values()))) if per_mac else 0.0
        # An SVD pair in a network costs more than its two Convs timed apart (the rank-r tensor
        # between them, two kernel launches): a measured correction per layer and rank.
        self.pair_fix: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, rs in pairs.items():
            layer = analysis.layer(key)
            ratio = [next(pair_times) / self._composed(layer, layer.cin, layer.cout, r) for r, _ in rs]
            self.pair_fix[key] = (np.log2([r for r, _ in rs]), np.asarray(ratio))
        self.overhead = 0.0   # seconds of the ops without MACs; see calibrate()
        self.scale = 1.0

    def _conv(self, site: Site, cin: float, cout: float, macs: float) -> float:
        return macs * self.surfaces[site](cin, cin if site.depthwise else cout)

    def layer_seconds(self, layer: Layer, kept: dict[int, int], rank: int | None = None) -> float:
        a = self.analysis
        if layer.key in a.dead(kept):
            return 0.0
        site = self.sites.get(layer.key)
        if site is None:
            return a.layer_macs(layer, kept, rank) * self.fallback
        cin, cout = a.channels(layer, kept)
        if site.depthwise:
            # Priced per MAC at the unpruned width. At its pruned width a narrow depthwise conv
            # looks dear, which bought no speed on MobileNetV2 (1.36x vs 1.37x at --flops 0.3)
            # and steered cuts to where they hurt more (top-1 agreement 0.80 vs 0.90 at 0.2).
            cin = layer.cin
        cin, cout = max(cin, 1), max(cout, 1)
        if rank is None:
            return self._conv(site, cin, cout, a.layer_macs(layer, kept))
        x, fix = self.pair_fix[layer.key]
        return self._composed(layer, cin, cout, rank) * float(np.interp(np.log2(rank), x, fix))

    def _composed(self, layer: Layer, cin: int, cout: int, rank: int) -> float:
        """An SVD pair priced as its k×k Cin→r Conv plus its 1×1 r→Cout Conv."""
        site = self.sites[layer.key]
        first = layer.hw_out * rank * cin * layer.kk
        return self._conv(site, cin, rank, first) + self._conv(site.out(), rank, cout, layer.hw_out * rank * cout)

    def layers_seconds(self, kept: dict[int, int] | None = None, ranks: dict[str, int] | None = None) -> float:
        """The MAC layers' seconds by the table alone (no calibration)."""
        kept, ranks = kept or {}, ranks or {}
        return (sum(self.layer_seconds(l, kept, ranks.get(l.key)) for l in self.analysis.layers)
                + sum(self._unit_conv(j, kept) for j in self.analysis.unit_convs(kept)))

    def _unit_conv(self, join: str, kept: dict[int, int]) -> float:
        a, site = self.analysis, self.join_sites[join]
        c = max(a.join_channels(join, kept), 1.0)
        return self._conv(site, c, c, c * site.size[0] * site.size[1])

    def seconds(self, kept: dict[int, int] | None = None, ranks: dict[str, int] | None = None) -> float:
        """Predicted seconds of one run: the MAC layers, scaled, plus the constant overhead."""
        return self.overhead + self.scale * self.layers_seconds(kept, ranks)

    def calibrate(self, measured: float) -> None:
        """Match the unpruned prediction to one measured run of the whole model: what the layers
        do not explain is overhead (ops without MACs); if they explain more, they are scaled down."""
        predicted = self.layers_seconds()
        self.scale = min(1.0, measured / predicted) if predicted > 0 else 1.0
        self.overhead = max(measured - predicted, 0.0)


def _site(layer: Layer) -> Site | None:
    if layer.op != "Conv" or len(layer.kernel) != 2 or len(layer.in_size) != 2:
        return None
    depthwise = layer.group > 1 and layer.group == layer.cin == layer.cout
    if layer.group > 1 and not depthwise:
        return None
    return Site(tuple(layer.kernel), tuple(layer.strides or (1, 1)), tuple(layer.in_size), depthwise)
