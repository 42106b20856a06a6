#!/usr/bin/env python
"""Build the bundled example: a small CNN trained on Animal-MNIST, with real samples beside it.

Writes into ``examples/`` (a few MB in all):

- ``animal_cnn.onnx``: :class:`models.animal_cnn.AnimalCNN` trained on the train split (input
  ``image``: 1x28x28 grey, dynamic batch; output ``logits``: 10 classes), BatchNorm as exported;
- ``animal_calib.npy``: 256 preprocessed train images, what ``--calib`` reads;
- ``animal_eval.npz``: the test split (``x`` preprocessed, ``y`` labels) for accuracy, never used
  for calibration or training.

Data: animal-mnist 0.4 from its wheel (``python tools/fetch_data.py`` downloads it), deduplicated
and split by image hash as in ``tools/bench_animal.py`` (``tools/data/animal_mnist_split.json``).
The model with the best val accuracy is kept; its test accuracy is printed.

    python tools/make_example.py [--epochs 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from bench_animal import split_images  # noqa: E402
from models.animal_cnn import AnimalCNN  # noqa: E402

OUT = REPO / "examples"
MEAN, STD = 0.5, 0.5
CALIB = 256


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28), (x/255 − 0.5)/0.5."""
    return ((images.astype(np.float32) / 255 - MEAN) / STD)[:, None]


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 512])).argmax(1) for i in range(0, len(x), 512)])
    return float((pred.numpy() == y).mean())


def train(data: dict, epochs: int, seed: int) -> tuple[torch.nn.Module, dict[str, float]]:
    torch.manual_seed(seed)
    model = AnimalCNN()
    (x, y), (xv, yv) = data["train"], data["val"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng = np.random.default_rng(seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        for i in range(0, len(order) - 63, 64):
            b = order[i:i + 64]
            xb = torch.from_numpy(x[b])
            flip = torch.from_numpy(rng.random(len(b)) < 0.5)
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)   # animals face either way
            loss = F.cross_entropy(model(xb), torch.from_numpy(y[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(model, xv, yv)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, val acc {val:.2%}", flush=True)
        if val > best:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), {"val": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    images, labels, idx, _ = split_images()
    data = {k: (preprocess(images[v]), labels[v].astype(np.int64)) for k, v in idx.items()}
    model, acc = train(data, args.epochs, args.seed)
    acc["test"] = accuracy(model, *data["test"])
    print(f"kept val acc {acc['val']:.2%}; test acc {acc['test']:.2%} on {len(data['test'][1])} images")

    OUT.mkdir(exist_ok=True)
    torch.onnx.export(model, torch.from_numpy(data["test"][0][:1]), OUT / "animal_cnn.onnx", opset_version=13,
                      input_names=["image"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    rng = np.random.default_rng(args.seed)
    calib = data["train"][0][np.sort(rng.choice(len(data["train"][0]), CALIB, replace=False))]
    np.save(OUT / "animal_calib.npy", calib)
    np.savez_compressed(OUT / "animal_eval.npz", x=data["test"][0], y=data["test"][1])
    for f in ("animal_cnn.onnx", "animal_calib.npy", "animal_eval.npz"):
        print(f"wrote examples/{f} ({(OUT / f).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
