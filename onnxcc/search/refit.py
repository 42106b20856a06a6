"""Weight reconstruction from calibration data (beyond the paper: no training needed).

For a layer ``y = W p + b`` (p: an input patch for Conv, a feature row for Gemm/MatMul) with
input second moments ``S = E[z zᵀ]`` over ``z = [p; 1]``:

- **Refit after pruning.** Keeping only the columns K (and the bias), the least-squares
  replacement is ``[W'_K, b'] = [W, b] · S[:, K⁺] · S[K⁺, K⁺]⁻¹`` with ``K⁺ = K ∪ {bias}``:
  the kept channels (and a constant) take over what the removed ones carried, as far as the
  data correlates them.
- **Activation-aware low rank.** With ``S_KK = L Lᵀ``, the best rank-r weight in the data's
  metric is ``U_r U_rᵀ W`` where ``W L = U Σ Vᵀ`` (``whitener`` gives L; the probe applies it).

A small ridge (relative to the trace) keeps the solves stable when calibration rows are few. It
pulls the solution towards the *original* weights, not towards zero: where the data leaves a
direction undetermined (a channel ReLU6 holds at 6, a dead one) the layer keeps what it had, and
a layer whose input did not change is left exactly as it was.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

MAX_ROWS = 16384
RIDGE = 1e-3


def _patches(x: np.ndarray, node: gs.Node) -> np.ndarray | None:
    """A 2-D Conv's input windows (N, C, Ho, Wo, kh, kw); None when not a plain 2-D Conv."""
    if x.ndim != 4 or node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        return None
    W = node.inputs[1].shape
    kh, kw = W[2], W[3]
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    pt, pl, pb, pr = node.attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def rows(x: np.ndarray, node: gs.Node, seed: int = 0, span: tuple[int, int] | None = None) -> np.ndarray | None:
    """The layer's input as regression rows (patches for a 2-D Conv), subsampled; None if n/a.

    Rows are chosen before the patches are gathered: a 3×3 Conv over 64 channels at 160×160
    has 600 MB of patches per 10 images, of which at most MAX_ROWS are used. ``span`` (first,
    total): ``x`` holds samples first.. of ``total``; the rows are those the whole set would
    give that fall in this part, so parts streamed one after another give the whole set's rows."""
    first, total = span or (0, len(x))
    if node.op == "Conv":
        win = _patches(x, node) if node.attrs.get("group", 1) == 1 else None
        if win is None:
            return None
        n, _, ho, wo = win.shape[:4]
        pick = _part(_pick(total * ho * wo, seed), first * ho * wo, n * ho * wo)
        if pick is None:
            r = win.transpose(0, 2, 3, 1, 4, 5)
        else:
            i, j, k = np.unravel_index(pick, (n, ho, wo))
            r = win[i, :, j, k]   # indices split by a slice go first: (rows, C, kh, kw)
        return np.ascontiguousarray(r.reshape(-1, x.shape[1] * win.shape[-2] * win.shape[-1]), np.float32)
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        r = x.reshape(len(x), -1)
    elif node.op == "MatMul":
        r = x.reshape(-1, x.shape[-1])
    else:
        return None
    per = len(r) // max(len(x), 1)   # rows per sample
    pick = _part(_pick(total * per, seed), first * per, len(r))
    return np.ascontiguousarray(r if pick is None else r[pick], np.float32)


def _pick(n: int, seed: int) -> np.ndarray | None:
    """Which of ``n`` rows to keep (None: all of them)."""
    return None if n <= MAX_ROWS else np.random.default_rng(seed).choice(n, MAX_ROWS, replace=False)


def _part(pick: np.ndarray | None, start: int, count: int) -> np.ndarray | None:
    """The picked rows among rows start..start+count, numbered from ``start``."""
    return None if pick is None else pick[(pick >= start) & (pick < start + count)] - start


def ridge(S: np.ndarray) -> np.ndarray:
    return S + _eps(S) * np.eye(len(S))


def _eps(S: np.ndarray) -> float:
    return RIDGE * float(np.trace(S)) / len(S)


def refit(Wm: np.ndarray, b: np.ndarray | None, S: np.ndarray, C: np.ndarray,
          keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares weights (zeros in removed columns) and bias; Wm is Cout × D.

    S = E[z zᵀ] of the current input, C = E[t zᵀ] with t the original model's input."""
    full = np.concatenate([Wm, (b if b is not None else np.zeros(len(Wm)))[:, None]], 1)
    kp = np.append(keep, b is not None)
    if not kp.any():   # an emptied input and no bias: nothing left to fit
        return np.zeros_like(Wm), None
    # minimise E‖full·t − X·z_K⁺‖² + ε‖X − full_K⁺‖²  ⇒  X = (full·C[:, K⁺] + ε·full_K⁺)·(S[K⁺, K⁺] + ε)⁻¹
    S_kk = S[np.ix_(kp, kp)]
    eps = _eps(S_kk)
    sol = np.linalg.solve(S_kk + eps * np.eye(len(S_kk)), (full @ C[:, kp] + eps * full[:, kp]).T).T
    out = np.zeros_like(Wm)
    out[:, keep] = sol[:, : keep.sum()]
    return out, (sol[:, -1] if b is not None else None)


def whitener(S: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """L with L Lᵀ = S_KK (input columns only, ridge-stabilised)."""
    k = np.append(keep, False)
    return np.linalg.cholesky(ridge(S[np.ix_(k, k)]))
