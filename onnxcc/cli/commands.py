"""One function per ``onnxcc`` command: parsed arguments → one library call → what is shown."""
from __future__ import annotations

import json
import os
import shutil
import sys
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..analysis.view import parse_input_shapes
from ..calib import ImagePreprocess
from ..config import CompressConfig, FinetuneConfig
from ..errors import UsageError
from ..resume import checkpoint_folder
from .render import (bench_tables, compress_summary, epoch_line, fail, fidelity_text, info_table, out, progress,
                     recovery_text)


def cmd_info(args: Namespace) -> int:
    from ..inspect import inspect_model, is_quantized

    ins = inspect_model(args.model, parse_input_shapes(args.input_shape))
    return _show({"model": str(args.model), **ins.to_dict(), "quantized": is_quantized(ins.model)}, info_table,
                 args.json)


def cmd_compress(args: Namespace) -> int:
    from ..compression import compress
    from ..io import check_output_path, load_model, save_model
    from ..report import write_report

    config = _compress_config(args)
    config.validate()
    check_output_path(args.output, [args.model], args.force)
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise UsageError(f"--report must be a folder: {args.report}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("compress runs in one process: run it alone, then 'torchrun … -m onnxcc finetune'")
    model = load_model(args.model)
    train = None
    if args.finetune:
        from ..finetuning import check_trainable, open_samples

        # bad settings, a missing torch, an op the executor lacks or bad data fail before minutes of work
        _finetune_config(args).validate()
        check_trainable(model, before_compression=True)
        train = open_samples(args.finetune, model, _preprocess(args))
    folder = checkpoint_folder(args.output)
    with progress() as report_progress, _resumable(folder):
        result = compress(model, calib=args.calib, input_shape=parse_input_shapes(args.input_shape),
                          progress=report_progress, preprocess=_preprocess(args), config=config,
                          checkpoint=folder, resume=args.resume)
        if train is not None:
            from ..finetuning import finetune_verified

            tuned, history = finetune_verified(result.model, model, train, config=_finetune_config(args),
                                               progress=report_progress, on_epoch=epoch_line)
            result.report["finetune"] = history
            result.model = tuned
    save_model(result.model, args.output)
    report_dir = Path(args.report) if args.report else Path(str(args.output) + ".report")
    write_report(result.report, report_dir)
    shutil.rmtree(folder, ignore_errors=True)
    compress_summary(args.output, result.report, report_dir)
    return 0


@contextmanager
def _resumable(folder: Path) -> Iterator[None]:
    """Ctrl-C says where the measurements are and how to continue from them."""
    try:
        yield
    except KeyboardInterrupt:
        if (folder / "run.json").is_file():
            fail(f"interrupted: what was measured is kept in {folder}/; run the same command with --resume "
                 "to continue from it")
        raise


def cmd_recover(args: Namespace) -> int:
    from ..calib import load_calibration
    from ..io import check_output_path, load_model, save_model
    from ..recover import MIN_SAMPLES, recover_checked

    if args.recover_time is not None and args.recover_time < 0:
        raise UsageError("--recover-time must not be negative")
    check_output_path(args.output, [args.model, args.teacher], args.force)
    student, teacher = load_model(args.model), load_model(args.teacher)
    data = load_calibration(student, args.calib, pinned=parse_input_shapes(args.input_shape), seed=args.seed,
                            preprocess=_preprocess(args))
    if data.synthetic:
        raise UsageError("recover needs real samples: give --calib")
    fit, held = data.split()
    if len(fit) < MIN_SAMPLES:
        raise UsageError(f"recovery needs more samples: {len(data)} given, {len(held)} of them held back to verify, "
                         f"{len(fit)} left to tune on ({MIN_SAMPLES} at least)")
    with progress() as report_progress:
        res = recover_checked(student, teacher, fit, held, mode=args.recover, seconds=args.recover_time,
                              seed=args.seed, provider=args.provider, device=args.device, progress=report_progress)
    save_model(res.model, args.output)
    final = res.record["held_out"][res.record["kept"]]
    out.print(f"[bold green]wrote[/] {args.output}: held-out {fidelity_text(final)}{recovery_text(res.record)}; "
              f"{res.record['seconds']} s")
    return 0


def cmd_finetune(args: Namespace) -> int:
    from ..finetuning import run_finetune_cli

    with progress() as report_progress:
        r = run_finetune_cli(args.model, args.teacher, args.data, args.output, args.val, _finetune_config(args),
                             preprocess=_preprocess(args), resume=args.resume, progress=report_progress,
                             on_epoch=epoch_line)
    if not r["main"]:
        return 0
    h = r["history"]
    out.print(f"[bold green]wrote[/] {r['output']}: {len(h['epochs'])} epoch(s), kept epoch {h['best_epoch']} "
              f"(by {h['selected_by']}); last train loss {h['epochs'][-1]['train_loss']:.4g}")
    return 0


def cmd_bench(args: Namespace) -> int:
    from ..benchmark import benchmark

    result = benchmark([str(m) for m in args.models], provider=args.provider, threads=args.threads,
                       batch=args.batch, runs=args.runs, input_shapes=parse_input_shapes(args.input_shape),
                       profile=args.profile)
    return _show(result, bench_tables, args.json)


def _show(result: dict, table: Callable[[dict], None], as_json: bool) -> int:
    """``--json``: one object on stdout, for scripts; else the tables."""
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        table(result)
    return 0


def _compress_config(args: Namespace) -> CompressConfig:
    return CompressConfig(flops=args.flops, latency=args.latency, method=args.method, steps=args.steps,
                          search_seconds=args.search_time,
                          provider=args.provider, seed=args.seed, round_to=args.round_to, threads=args.threads,
                          latency_aware=not args.no_latency_model, tries=args.tries, recover=args.recover,
                          recover_seconds=args.recover_time, min_fidelity=args.min_fidelity, device=args.device,
                          ray_address=args.ray_address, ray_workers=args.ray_workers,
                          memory_check=not args.skip_memory_check)


def _finetune_config(args: Namespace) -> FinetuneConfig:
    return FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                          warmup=args.warmup, augment=not args.no_augment, batchnorm=args.batchnorm,
                          device=args.device, workers=args.workers, seed=args.seed)


def _preprocess(args: Namespace) -> ImagePreprocess:
    return ImagePreprocess(size=tuple(args.image_size), mean=tuple(args.mean), std=tuple(args.std),
                           scale=args.scale, layout=args.layout, bgr=args.bgr, crop=args.center_crop)
