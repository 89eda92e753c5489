"""``python -m training.run``: train recurrent video restoration models with and without SRN-C,
evaluate them, test their stability on a long video, and write a report.

With no arguments it runs the default pipeline on the embedded synthetic data (a few minutes on
a CPU): an unconstrained VResNet-feat and the same with SRN-C, their PSNR per frame, the
long-video instability test, the true spectral norms of their layers, and a run folder with
config, logs, checkpoints, ``metrics.json``, ``report.md`` and PNG plots.

Subcommands run single stages: ``train``, ``eval``, ``instability``, ``spectra``, ``trf`` (the
temporal receptive field diagnostic of a checkpoint or an untrained model), ``figure2b`` and
``reproduce`` (the paper's experiments at a CPU scale, resumable, with ``reproduction.md``).
Configuration: ``--preset {default,smoke,paper}``, ``--config FILE.json``, ``--set key=value``
(repeatable; e.g. ``--set model=vdncnn-rlsp --set methods=none,srnc-2-0.1,sn-1``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import evaluate, report
from .config import PRESETS, Config, make_config
from .constraints import METHODS
from .data import FrameFolder, SyntheticClips, long_sequence
from .models import MODEL_NAMES, Bursts
from .run_folder import RunExists, RunFolderBusy, claim, refuse_existing, write_json_atomic
from .train import build, load_trained, train


COMMON = ("preset", "config", "set", "out", "no_progress", "overwrite")


def _common(after: bool) -> argparse.ArgumentParser:
    """The options every command takes, accepted before or after the subcommand: after it they
    land under ``<name>_after`` (defaults suppressed) and ``_parse`` merges them."""
    suffix = "_after" if after else ""
    default = (lambda value: argparse.SUPPRESS) if after else (lambda value: value)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", dest="preset" + suffix, default=default("default"), choices=sorted(PRESETS),
                        help="configuration preset")
    common.add_argument("--config", dest="config" + suffix, default=default(None),
                        help="a JSON file of config keys (applied after the preset)")
    common.add_argument("--set", dest="set" + suffix, action="append", default=default([]), metavar="KEY=VALUE",
                        help="override a config key (repeatable); keys: " + ", ".join(Config.__dataclass_fields__))
    common.add_argument("--out", dest="out" + suffix, default=default(None),
                        help="run folder (default: runs/<time>-<model>)")
    common.add_argument("--no-progress", dest="no_progress" + suffix, action="store_true", default=default(False),
                        help="no progress bar")
    common.add_argument("--overwrite", dest="overwrite" + suffix, action="store_true", default=default(False),
                        help="replace what an earlier command wrote under the same names (refused otherwise)")
    return common


def _parser() -> argparse.ArgumentParser:
    after = _common(after=True)
    parser = argparse.ArgumentParser(prog="python -m training.run", description=__doc__, parents=[_common(False)],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"models: {', '.join(MODEL_NAMES)}; methods: {', '.join(METHODS)}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("pipeline", parents=[after], help="the default: train, evaluate, test stability, report")
    train_p = sub.add_parser("train", parents=[after], help="train one model")
    train_p.add_argument("--method", default="srnc", choices=METHODS)
    train_p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    for name, text in (("eval", "PSNR per frame of a checkpoint"), ("instability", "long-video instability test"),
                       ("spectra", "true spectral norms and stable ranks of a checkpoint's conv layers")):
        p = sub.add_parser(name, parents=[after], help=text)
        p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
        p.add_argument("--method", default="srnc", choices=METHODS)
    trf_p = sub.add_parser("trf", parents=[after], help="temporal receptive field diagnostic (section 2.2)")
    source = trf_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint.pt written by train")
    source.add_argument("--model", choices=MODEL_NAMES, help="an untrained model of this name")
    trf_p.add_argument("--method", default="none", choices=METHODS, help="constraint of the model (default none)")
    sub.add_parser("figure2b", parents=[after], help="output norm of untrained models of every architecture")
    rep = sub.add_parser("reproduce", parents=[after],
                         help="the paper's experiments at CPU scale, resumable, with reproduction.md "
                              "(--preset default or smoke; --out defaults to runs/reproduce-<preset>)")
    rep.add_argument("--only", help="comma-separated experiments (default: fig2b,table3,table2,table5,appendixG,"
                                    "appendixEF; also: recipe, the recipe search)")
    rep.add_argument("--export", metavar="DIR", help="also copy reproduction.md, its figures and the measurement "
                                                     "records to DIR (e.g. docs/reproduction)")
    return parser


def _parse(argv) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in COMMON:
        if hasattr(args, name + "_after"):
            late = getattr(args, name + "_after")
            delattr(args, name + "_after")
            if name == "set":
                late = args.set + late  # both places: in the order given
            elif name in ("no_progress", "overwrite"):
                late = late or getattr(args, name)
            elif getattr(args, name) != parser.get_default(name) and late != getattr(args, name):
                parser.error(f"--{name.replace('_', '-')} given twice, before and after the subcommand, "
                             f"with different values ({getattr(args, name)!r}, {late!r})")
            setattr(args, name, late)
    if getattr(args, "resume", False) and args.overwrite:
        parser.error("--resume and --overwrite exclude each other: continue the run or start it over")
    return args


def _run_folder(args, config: Config) -> Path:
    """The command's folder (not created here: ``run_folder.claim`` does it once the run starts)."""
    return Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.model}"


def _eval_clips(config: Config):
    return SyntheticClips(config.eval_clips, frames=config.frames, size=config.crop, seed=config.seed + 10_000,
                          channels=config.channels)


def _long_frames(config: Config):
    if config.long_video:
        folder = FrameFolder(config.long_video, channels=config.channels)
        return iter(folder), min(len(folder), config.long_frames)
    return (long_sequence(config.long_frames, size=config.crop, seed=config.seed + 20_000, channels=config.channels),
            config.long_frames)


def _inference_model(config: Config, model):
    """The model as evaluated: burst by burst when ``burst`` is set (appendix E)."""
    return Bursts(model, config.burst, config.burst_overlap) if config.burst else model


def stage_eval(config: Config, model):
    return evaluate.psnr_per_frame(_inference_model(config, model), _eval_clips(config), config.task,
                                   config.sigma / 255.0, y_channel=config.y_channel, crop_border=config.crop_border,
                                   device=config.device)


def stage_instability(config: Config, model):
    frames, n = _long_frames(config)
    limited = (f for _, f in zip(range(n), frames))
    return evaluate.instability_test(_inference_model(config, model), limited,
                                     evaluate.degrader(config.task, config.sigma / 255.0), device=config.device)


def stage_spectra(config: Config, model):
    """Per layer: sigma_1 and stable rank of the true operator (``srnc_ext.spectral``)."""
    from srnc_ext import spectral

    size = config.input_size
    return [vars(row) for row in spectral.model_report(model.cpu(), size)]


def stage_trf(config: Config, model, folder: Path, name: str) -> dict:
    """TRF of ``model``: ``trf_<name>.png`` (the paper's layout), ``influence_<name>.png`` and a summary."""
    from srnc_ext import diagnostics, plots

    result = diagnostics.trf(model, frames=config.trf_frames, size=config.trf_size, iters=config.trf_iters,
                             channels=config.channels, seed=config.seed, device=config.device, progress=False)
    plots.trf_figure(result, folder / f"trf_{name}.png")
    plots.influence_figure(result, folder / f"influence_{name}.png")
    return {"verdict": result.verdict, "reason": result.reason, "extent": result.extent, "growth": result.growth,
            "tail_rate": result.tail_rate,
            "tau": result.tau, "nonfinite_at": result.nonfinite_at,
            "p_final": result.p_history[-1] if result.p_history else None,
            "influence": result.influence.tolist(), "settings": result.settings}


def average_spectrum(config: Config, model, points: int = 100):
    """The singular value spectrum averaged over the conv layers, as the paper plots it (Table 2,
    "computed as in [46]": Sedghi et al.'s FFT, i.e. each layer taken with circular padding),
    each layer's sorted spectrum resampled to ``points`` positions in [0, 1]."""
    from srnc_ext import spectral

    size = config.input_size
    curves = []
    for conv in model.modules():
        if not isinstance(conv, torch.nn.Conv2d) or conv.stride != (1, 1):
            continue
        weight = conv.effective_weight() if hasattr(conv, "effective_weight") else conv.weight
        kh, kw = conv.kernel_size
        padding = ((kh - 1) * conv.dilation[0] // 2, (kw - 1) * conv.dilation[1] // 2)
        values = spectral.singular_values(weight, size, padding=padding, dilation=conv.dilation,
                                          groups=conv.groups, padding_mode="circular", method="fft")
        grid = torch.linspace(0, len(values) - 1, points, dtype=torch.float64)
        curves.append(values[grid.round().long()])
    return torch.stack(curves).mean(0).tolist()


PIPELINE_OUTPUTS = ("config.json", "metrics.json", "report.md")


def method_configs(config: Config):
    """``(spec, method, config)`` for every method of ``config.methods``, each validated."""
    import dataclasses

    from .constraints import parse_method

    out = []
    for spec in config.methods:
        method, params = parse_method(spec)
        out.append((spec, method, dataclasses.replace(config, **params).validate()))
    return out


def preflight(config: Config, *, long_video: bool = True) -> None:
    """Everything a run reads, checked before its first step: the device, the training data
    and the long test video (a bad folder is refused before any model is trained)."""
    from .config import check_device_available
    from .train import training_clips

    check_device_available(config.device)
    training_clips(config)
    if long_video and config.long_video:
        FrameFolder(config.long_video, channels=config.channels)


def pipeline(config: Config, folder: Path, progress: bool, overwrite: bool = False) -> dict:
    """Train, evaluate and test every method of ``config.methods`` (specs like ``srnc-2-0.1``, see
    ``constraints.parse_method``); a model whose training diverges is recorded and the job goes on.
    Everything is checked first; the folder is locked; a folder with an earlier run is refused
    unless ``overwrite``."""
    from .train import TrainingDiverged

    runs = method_configs(config)
    preflight(config)
    existing = [folder / name for name in PIPELINE_OUTPUTS] + [folder / spec / "checkpoint.pt" for spec, _, _ in runs]
    if not overwrite:
        refuse_existing(existing, "an earlier run's output")
    with claim(folder) as run:
        if not overwrite:
            refuse_existing(existing, "an earlier run's output")  # again, holding the lock
        write_json_atomic(folder / "config.json", config.to_dict())
        run.started()
        metrics = {"train": {}, "eval": {}, "instability": {}, "spectra": {}, "average_spectrum": {}, "trf": {},
                   "asked": {}}
        for spec, method, cfg in runs:
            metrics["asked"][spec] = {"method": method, "alpha": cfg.alpha, "beta": cfg.beta}
            print(f"== {spec}: training {cfg.model} for {cfg.steps} steps", flush=True)
            try:
                metrics["train"][spec] = train(cfg, method, folder / spec, progress=progress, overwrite=overwrite)
            except TrainingDiverged as err:
                metrics["train"][spec] = {"method": method, "steps": err.step, "last_loss": err.loss,
                                          "diverged_at": err.step}
                print(f"   {err}: recorded, going on", flush=True)
                continue
            model = load_trained(cfg, method, folder / spec / "checkpoint.pt")
            metrics["eval"][spec] = stage_eval(cfg, model)
            metrics["instability"][spec] = stage_instability(cfg, model)
            metrics["spectra"][spec] = stage_spectra(cfg, model)
            metrics["average_spectrum"][spec] = average_spectrum(cfg, model)
            metrics["trf"][spec] = stage_trf(cfg, model, folder, spec)
            e, st = metrics["eval"][spec], metrics["instability"][spec]
            print(f"   PSNR_1 {e['psnr_1']:.2f}  PSNR_T {e['psnr_T']:.2f}  mean {e['mean']:.2f} dB; "
                  f"{st['instabilities']} instabilities in {st['frames']} frames; TRF: {metrics['trf'][spec]['verdict']}",
                  flush=True)
        metrics["input_psnr"] = evaluate.input_psnr(_eval_clips(config), config.task, config.sigma / 255.0)
        report.write_metrics(folder, metrics)
        report.plot_psnr_per_frame(folder, metrics["eval"])
        report.plot_long_sequence(folder, metrics["instability"])
        report.plot_spectra(folder, metrics["spectra"], metrics["average_spectrum"])
        path = report.write_report(folder, config.to_dict(), metrics)
    print(f"report: {path}")
    return metrics


def _reproduce(args, argv) -> int:
    from .reproduce import reproduce

    argv = sys.argv[1:] if argv is None else argv
    folder = Path(args.out or f"runs/reproduce-{args.preset}")
    with claim(folder):  # resumable by design: an existing folder is continued, never two at once
        reproduce(folder, preset=args.preset, only=args.only, config_file=args.config, overrides=args.set,
                  command="python -m training.run " + " ".join(argv), export_to=args.export)
    return 0


def _single_stage(command: str, args, config: Config, folder: Path) -> None:
    """``train``, ``eval``, ``instability``, ``spectra``, ``trf``, ``figure2b``: each writes under
    its own names (``<command>-<method>.json``, ...) and never replaces an earlier result unless
    ``--overwrite``."""
    if command == "train":
        preflight(config, long_video=False)
        with claim(folder):
            summary = train(config, args.method, folder / args.method, resume=args.resume, overwrite=args.overwrite,
                            progress=not args.no_progress,
                            on_start=lambda: write_json_atomic(folder / args.method / "config.json", config.to_dict()))
        print(json.dumps(summary, indent=1))
        return
    from .config import check_device_available

    check_device_available(config.device)
    if command == "figure2b":
        outputs = [folder / "figure2b.json", folder / "figure2b.png"]
        args.overwrite or refuse_existing(outputs, "an earlier figure2b")
        from .figures import output_norms, plot_figure2b

        curves = output_norms()
        with claim(folder) as run:
            args.overwrite or refuse_existing(outputs, "an earlier figure2b")
            run.started()
            report.write_metrics(folder, {"figure2b": curves}, name=outputs[0].name)
            print(f"figure: {plot_figure2b(curves, outputs[1])}")
        return
    if command == "trf":
        if args.checkpoint:
            model = load_trained(config, args.method, args.checkpoint)
        else:
            config.model = args.model
            model = build(config, args.method).eval()
        name = f"{config.model}-{args.method}"
        outputs = [folder / f"trf-{name}.json", folder / f"trf_{name}.png", folder / f"influence_{name}.png"]
        args.overwrite or refuse_existing(outputs, "an earlier trf result")
        with claim(folder) as run:
            args.overwrite or refuse_existing(outputs, "an earlier trf result")
            run.started()
            result = stage_trf(config, model, folder, name)
            _write_result(outputs[0], command, args, config, result)
        print(json.dumps({k: v for k, v in result.items() if k != "influence"}, indent=1, default=str))
        return
    if config.long_video and command == "instability":
        FrameFolder(config.long_video, channels=config.channels)  # checked before the model runs
    model = load_trained(config, args.method, args.checkpoint)
    output = folder / f"{command}-{args.method}.json"
    args.overwrite or refuse_existing([output], f"an earlier {command} result")
    if command == "spectra":
        result = {"layers": stage_spectra(config, model), "average_spectrum": average_spectrum(config, model)}
    else:
        result = {"eval": stage_eval, "instability": stage_instability}[command](config, model)
    with claim(folder) as run:
        args.overwrite or refuse_existing([output], f"an earlier {command} result")
        run.started()
        _write_result(output, command, args, config, result)
    print(json.dumps(result if command != "instability" else {k: v for k, v in result.items() if k != "psnr_trace"},
                     indent=1, default=str))


def _write_result(path: Path, command: str, args, config: Config, result) -> None:
    report.write_metrics(path.parent, {"command": command, "method": args.method,
                                       "checkpoint": getattr(args, "checkpoint", None), "config": config.to_dict(),
                                       command: result}, name=path.name)


def _os_error(err: OSError) -> str:
    text = err.strerror or str(err)
    return f"{text}: {err.filename}" if getattr(err, "filename", None) else text


INTERRUPTED = {  # what an interruption leaves, per command
    "pipeline": "the checkpoints of the models trained so far are kept; rerun with --overwrite to start over",
    "train": "the last checkpoint is kept (continue with `train --resume`)",
    "reproduce": "every finished model and measurement is cached; rerun the same command to resume",
}


def main(argv=None) -> int:
    """The CLI; every refusal or failure is one line on stderr (exit 2: bad input or a refused
    run, 1: the run failed, 128 + signal number: interrupted)."""
    from .stop_signals import TrainingInterrupted
    from .train import TrainingDiverged

    args = _parse(argv)
    command = args.command or "pipeline"
    try:
        if command == "reproduce":
            return _reproduce(args, argv)
        config = make_config(args.preset, args.config, args.set)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command != "train":
            print("error: under torchrun use the `train` subcommand (evaluate afterwards in one process)",
                  file=sys.stderr)
            return 2
        folder = _run_folder(args, config)
        if command == "pipeline":
            pipeline(config, folder, not args.no_progress, overwrite=args.overwrite)
        else:
            _single_stage(command, args, config, folder)
    except TrainingInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print(f"\ninterrupted: {INTERRUPTED.get(command, 'nothing was written')}", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    except (RunFolderBusy, RunExists) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err.args[0] if len(err.args) == 1 else _os_error(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, permissions
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (smaller width, crop, batch or frames?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
