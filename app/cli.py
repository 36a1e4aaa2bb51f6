"""The `synthgen` command line: train, generate, evaluate, serve, worker and db; `bench` and `dataset` (the Python
client's command) have their own parsers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from app import __version__
from app.core.allocator import tune_allocator
from app.errors import InvalidInputError, SynthgenError

if TYPE_CHECKING:
    from app.settings import Settings

Number = TypeVar("Number", int, float)


def _exit_with_parent() -> None:
    """Stop when the process that started this one is gone (a killed job worker must not leave its training
    running; the worker that takes the job over resumes it)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _port(text: str) -> int:
    """An argparse type: a TCP port to listen on, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65_535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _process_options(parser: argparse.ArgumentParser) -> None:
    """What a training job's child processes are given: fewer threads, lower priority, a share of the GPU."""
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    parser.add_argument("--gpu-memory-fraction", type=float, default=None, help="most of the GPU's memory to use")
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


def _check_model_folder(text: str) -> None:
    """--model names a model's folder; a name (as the server takes) gets a hint."""
    if not Path(text).is_dir():
        hint = f"did you mean models/{text}?" if (Path("models") / text).is_dir() else \
            "give a model's folder, such as models/mnist-cgan"
        raise InvalidInputError(f"--model {text}: no such model folder; {hint}")


def _sample_options(parser: argparse.ArgumentParser) -> None:
    """Which samples a command writes: the model and the plan."""
    parser.add_argument("--model", required=True, help="model folder, e.g. models/mnist-cgan")
    parser.add_argument("--per-class", type=int, default=None, help="N samples of every class")
    parser.add_argument("--n", type=int, default=None, help="N samples (with --label, all of that class)")
    parser.add_argument("--label", default=None, help="class name or index (with --n)")
    parser.add_argument("--seed", type=int, default=0)


def _apply_process_options(args: argparse.Namespace) -> None:
    import os

    import torch

    if args.exit_with_parent:
        _exit_with_parent()
    if args.nice:
        os.nice(args.nice)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_memory_fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction)


def _hyperparameters(text: str | None) -> dict[str, object]:
    """--hparams: a JSON object."""
    if not text:
        return {}
    try:
        hyperparameters = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"--hparams is not valid JSON ({exc}); e.g. '{{\"latent_dim\": 32}}'") from exc
    if not isinstance(hyperparameters, dict):
        raise InvalidInputError(f"--hparams must be a JSON object of hyper-parameters, not {text}")
    return hyperparameters


def _train(args: argparse.Namespace) -> None:
    from app.ml.training import TrainOptions, train

    hyperparameters = _hyperparameters(args.hparams)
    _apply_process_options(args)
    summary = train(TrainOptions(arch=args.arch, data=args.data, out=Path(args.out), epochs=args.epochs,
                                 seed=args.seed, device=args.device, resume=args.resume, batch_size=args.batch_size,
                                 lr=args.lr if args.lr is not None else (2e-4 if args.arch == "gan" else 1e-3),
                                 d_lr=args.d_lr, lr_decay_epochs=args.lr_decay_epochs,
                                 val_fraction=args.val_fraction, val_data=args.val_data,
                                 hyperparameters=hyperparameters,
                                 class_names=args.class_names.split(",") if args.class_names else None,
                                 progress=not args.quiet,
                                 tensorboard_dir=Path(args.tensorboard) if args.tensorboard else None))
    print(json.dumps(summary, indent=2, sort_keys=True))


def _generate(args: argparse.Namespace) -> None:
    from app.core.device import resolve_device
    from app.core.model import load_model
    from app.core.sampling import sample
    from app.engine.archives import check_output, write_output
    from app.engine.plans import build_manifest, plan_samples

    check_output(Path(args.out))
    model = load_model(args.model, resolve_device(args.device))
    plan = plan_samples(model, per_class=args.per_class, n=args.n, label=args.label, seed=args.seed,
                        truncation=args.truncation, max_samples=sys.maxsize, scope="the command line")
    images, drawn = sample(model, plan.seed, plan.labels(), truncation=plan.truncation)
    out_format = {".parquet": "parquet", ".tar": "tar"}.get(Path(args.out).suffix, "zip")  # as the server names it
    manifest = build_manifest(model, plan, out_format)  # written into a zip, its directory, a shard or a table
    write_output(Path(args.out), images, drawn, model.class_names, plan.seed, manifest)
    print(f"wrote {len(images)} samples of {model.name} to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from app.core.model import load_model
    from app.engine.archives import check_output_dir
    from app.engine.plans import plan_samples
    from app.engine.shards import shards_of, write_manifest, write_shard

    out = Path(args.out)
    check_output_dir(out)
    model = load_model(args.model, "cpu")
    plan = plan_samples(model, per_class=args.per_class, n=args.n, label=args.label, seed=args.seed,
                        max_samples=sys.maxsize, scope="the command line")
    shards = shards_of(plan, args.shard_size)  # checks the shard size before anything is written
    if args.ray:
        from app.engine.ray_export import export_on_ray

        summary = export_on_ray(args.ray, Path(args.model), plan, args.shard_size, out, args.actors,
                                args.gpus_per_actor, args.cpus_per_actor)
    else:
        out.mkdir(parents=True, exist_ok=True)
        written = [write_shard(model, plan, shard, args.shard_size, out) for shard in shards]
        summary = {"shards": len(written), "samples": len(plan), "manifest": str(write_manifest(model, plan, written,
                                                                                                 out))}
    print(json.dumps(summary, sort_keys=True))


def _numbers(option: str, text: str, kind: Callable[[str], Number]) -> tuple[Number, ...]:
    """A comma-separated list of numbers (`--scales`, `--seeds`), at least one."""
    try:
        numbers = tuple(kind(item) for item in text.split(","))
    except ValueError as exc:
        raise InvalidInputError(f"{option} takes comma-separated numbers, not {text!r}: {exc}") from exc
    return numbers


def _check_per_class(per_class: int) -> None:
    if per_class < 1:
        raise InvalidInputError(f"--per-class must be at least 1, not {per_class}")


def _evaluate(args: argparse.Namespace) -> None:
    from app.ml.evaluation import evaluate

    _check_per_class(args.per_class)
    _apply_process_options(args)
    card = evaluate(Path(args.model), args.data, test_spec=args.test_data, per_class=args.per_class, seed=args.seed,
                    device=args.device, progress=not args.quiet, val_spec=args.val_data)
    print(json.dumps(card["metrics"], indent=2, sort_keys=True))


def _tune(args: argparse.Namespace) -> None:
    from app.core.checkpoint import read_json
    from app.ml.protocol import tune_latent_scale

    scales, seeds = _numbers("--scales", args.scales, float), _numbers("--seeds", args.seeds, int)
    if not scales or not all(0 < scale <= 4 for scale in scales):
        raise InvalidInputError(f"every scale must be in (0, 4], not {args.scales}")
    _check_per_class(args.per_class)
    if not 0 <= args.min_label_agreement <= 1:
        raise InvalidInputError(f"--min-label-agreement must be in [0, 1], not {args.min_label_agreement}")
    if not 0 <= args.min_confidence <= 1:
        raise InvalidInputError(f"--min-confidence must be in [0, 1], not {args.min_confidence}")
    _apply_process_options(args)
    before = read_json(Path(args.model) / "config.json").get("label_filter") if Path(args.model).is_dir() else None
    sampling = tune_latent_scale(Path(args.model), args.data, scales, args.per_class, seeds, val_spec=args.val_data,
                                 min_label_agreement=args.min_label_agreement,
                                 min_confidence=args.min_confidence or None)
    for arm, figure in sampling["validation_tstr"].items():
        print(f"latent_scale {arm:<14s}  validation TSTR {figure['mean']:.4f} ± {figure['std']:.4f}  "
              f"label agreement {sampling['label_agreement'][arm]:.4f}")
    if not sampling["floor_met"]:
        print(f"no scale reached label agreement {sampling['label_agreement_floor']:.4f} "
              f"({args.min_label_agreement} × the real validation images' {sampling['real_val_accuracy']:.4f}): "
              "took the scale with the highest; the samples are often not what their label says", file=sys.stderr)
    if before and not sampling["label_filter"]:
        print(f"the label filter this model had ({before}) is off now: it was not among the arms tried "
              "(--min-confidence) or did not win", file=sys.stderr)
    filtered = f", through the label filter at {args.min_confidence}" if sampling["label_filter"] else ""
    print(f"chosen: {sampling['latent_scale']}{filtered} (written to config.json); run synthgen evaluate and "
          "protocol again")


def _protocol(args: argparse.Namespace) -> None:
    from app.ml.protocol import run_protocol

    seeds = _numbers("--seeds", args.seeds, int)
    _check_per_class(args.per_class)
    report = run_protocol(Path(args.model), args.data, args.test_data, args.per_class, seeds, val_spec=args.val_data)
    for arm, figure in report.items():
        if "mean" in figure:
            print(f"{arm:34s} {figure['mean']:.4f}" + (f" ± {figure['std']:.4f}" if "std" in figure else ""))


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    """SYNTHGEN_* settings with the command line's overrides."""
    from pydantic import ValidationError

    from app.settings import Settings

    overrides = {key: getattr(args, key, None) for key in ("models_dir", "device")} | extra
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        # without the values pydantic would quote: a refused database URL may hold a password
        errors = "; ".join((f"SYNTHGEN_{'.'.join(map(str, error['loc'])).upper()}: " if error["loc"] else "")
                           + error["msg"].removeprefix("Value error, ") for error in exc.errors())
        raise InvalidInputError(f"invalid settings: {errors}") from exc


def _serve(args: argparse.Namespace) -> None:
    from app.api.server import serve

    serve(_settings(args, run_jobs=False if args.no_jobs else None), args.host, args.port)


def _worker(args: argparse.Namespace) -> None:
    import asyncio

    from app.api.logs import configure_logging
    from app.engine.worker import run_worker

    settings = _settings(args)
    configure_logging(settings.log_level)
    asyncio.run(run_worker(settings, args.metrics_port))


def _db(args: argparse.Namespace) -> None:
    import sqlalchemy as sa

    from app.engine.schema import create_engine, database_url, upgrade

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(database_url(settings.database_url, settings.data_dir))
    try:
        upgrade(engine)
    except sa.exc.OperationalError as exc:  # unreachable, refused, wrong password, no such database
        reason = (str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SynthgenError(f"cannot use the jobs database {engine.url.render_as_string(hide_password=True)}: "
                            f"{reason}") from exc
    print("the jobs database schema is up to date")


def _val_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--val-data", default=None, help="the validation data SPEC, for a model trained with "
                        "--val-data (default: the one in its config.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synthgen", description="Synthetic image datasets from GANs and VAEs.")
    parser.add_argument("--version", action="version", version=f"synthgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a GAN or VAE on a dataset")
    train.add_argument("--arch", choices=["gan", "vae"], required=True)
    train.add_argument("--data", required=True, help="data SPEC: a path (.npz, .zip, IDX, folder) or 'digits', "
                                                     "optionally with #START:STOP")
    train.add_argument("--out", required=True, help="model folder to write, e.g. models/NAME")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 GAN, 1e-3 VAE)")
    train.add_argument("--d-lr", type=float, default=None, help="the discriminator's learning rate, e.g. twice "
                       "--lr for two time-scale updates (default: --lr for a GAN, 2e-4 for a VAE's discriminator)")
    train.add_argument("--lr-decay-epochs", type=int, default=0, help="over the last this many epochs, bring the "
                       "learning rates linearly down to zero (default: 0, constant)")
    train.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out at random to "
                       "validate on")
    train.add_argument("--val-data", default=None, help="validation data SPEC instead of --val-fraction, all of --data "
                       "then trains: e.g. a block of other writers' digits, so that selection judges unseen writers")
    train.add_argument("--hparams", default=None, help='JSON hyper-parameter overrides, e.g. \'{"latent_dim": 32}\'')
    train.add_argument("--class-names", default=None, help="comma-separated names of labels 0..K-1, e.g. "
                       "t-shirt,trouser,… (IDX files carry none)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--tensorboard", default=None, help="write TensorBoard event files (losses, sample grids) "
                       "into this folder")
    _process_options(train)
    train.set_defaults(run=_train)

    export = commands.add_parser("export", help="write a dataset as WebDataset shards and a manifest, in this "
                                 "process or across a Ray cluster (--ray)")
    _sample_options(export)
    export.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    export.add_argument("--out", required=True, help="folder for the shards and manifest.json (with --ray: one "
                        "every node sees)")
    export.add_argument("--ray", default=None, help="address of a Ray cluster (e.g. 10.0.0.1:6379, or auto)")
    export.add_argument("--actors", type=int, default=2, help="with --ray: model replicas writing shards")
    export.add_argument("--gpus-per-actor", type=float, default=0.0, help="with --ray: GPUs each actor takes (0: CPU)")
    export.add_argument("--cpus-per-actor", type=float, default=1.0, help="with --ray: CPUs each actor takes (the "
                        "rest encode)")
    export.set_defaults(run=_export)

    generate = commands.add_parser("generate",
                                   help="write samples to .npz, .zip, a .png grid or an ImageFolder directory")
    _sample_options(generate)
    generate.add_argument("--truncation", type=float, default=1.0,
                          help="latent scale (GAN ψ, VAE temperature) times the model's latent_scale")
    generate.add_argument("--out", required=True, help="PATH.npz, PATH.zip, PATH.png (a grid) or a directory")
    generate.add_argument("--device", default="auto")
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser("evaluate", help="measure a model and write its card.json")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="the training data SPEC (split as in training)")
    evaluate.add_argument("--test-data", default=None, help="real data no training saw, for held-out scores")
    _val_data_option(evaluate)
    evaluate.add_argument("--per-class", type=int, default=1000, help="synthetic samples per class")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--quiet", action="store_true")
    _process_options(evaluate)
    evaluate.set_defaults(run=_evaluate)

    protocol = commands.add_parser("protocol", help="TSTR with a fixed CNN over seeds, on real test data; writes the "
                                                    "card's protocol section")
    protocol.add_argument("--model", required=True)
    protocol.add_argument("--data", required=True, help="the training data SPEC (its training split is the real arm)")
    protocol.add_argument("--test-data", required=True, help="real data never used for training or selection")
    _val_data_option(protocol)
    protocol.add_argument("--per-class", type=int, default=1000)
    protocol.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the CNN")
    protocol.set_defaults(run=_protocol)

    tune = commands.add_parser("tune", help="choose the spread of default draws (latent_scale) and the label filter "
                                            "on the validation split by TSTR; writes config.json and the card's "
                                            "sampling section")
    tune.add_argument("--model", required=True)
    tune.add_argument("--data", required=True, help="the training data SPEC (its validation split scores each scale)")
    _val_data_option(tune)
    tune.add_argument("--scales", default="1,1.25,1.5,2,2.5,3", help="comma-separated candidates, each in (0, 4]")
    tune.add_argument("--per-class", type=int, default=1000)
    tune.add_argument("--seeds", default="0,1", help="comma-separated seeds of the CNN")
    tune.add_argument("--min-label-agreement", type=float, default=0.95,
                      help="only scales whose samples the evaluator classifies as their label at least this share as "
                           "often as real validation images (0 turns the check off)")
    tune.add_argument("--min-confidence", type=float, default=0,
                      help="also try each scale through the model's label filter: a sample is drawn again until the "
                           "evaluator gives its label at least this probability, e.g. 0.5 (default 0: no filter)")
    _process_options(tune)
    tune.set_defaults(run=_tune)

    serve = commands.add_parser("serve", help="serve the model repository over HTTP (settings: SYNTHGEN_* env)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--models-dir", default=None, help="overrides SYNTHGEN_MODELS_DIR (default: models)")
    serve.add_argument("--device", default=None, help="overrides SYNTHGEN_DEVICE: auto, cpu, cuda or cuda:N")
    serve.add_argument("--no-jobs", action="store_true", help="leave jobs to `synthgen worker` processes "
                       "(SYNTHGEN_RUN_JOBS=false)")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run dataset jobs and trainings from the shared jobs database (no "
                                 "API)")
    worker.add_argument("--models-dir", default=None, help="overrides SYNTHGEN_MODELS_DIR (default: models)")
    worker.add_argument("--device", default=None, help="overrides SYNTHGEN_DEVICE: auto, cpu, cuda or cuda:N")
    worker.add_argument("--metrics-port", type=_port, default=None,
                        help="serve Prometheus metrics on this port (it answers once the models are loaded)")
    worker.set_defaults(run=_worker)

    db = commands.add_parser("db", help="the jobs database (SYNTHGEN_DATABASE_URL, default SQLite in the data dir)")
    db.add_argument("action", choices=["upgrade"], help="upgrade: migrate the schema to this version")
    db.set_defaults(run=_db)

    commands.add_parser("dataset", help="have a synthgen server generate a dataset and download it (needs the "
                        "client: pip install ./clients/python)", add_help=False)
    commands.add_parser("bench", help="benchmark against the raw model, LitServe and plain FastAPI (--quick: CI)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tune_allocator()  # before the first tensor: every command runs forward passes
    if argv[:1] == ["bench"]:  # its own parser: python -m app.bench.run --help
        from app.bench.run import main as bench

        return bench(argv[1:])
    if argv[:1] == ["dataset"]:  # the client's command: synthgen-client dataset --help
        try:
            from synthgen_client.cli import main as client
        except ImportError:
            print("synthgen dataset: the Python client is not installed: pip install ./clients/python", file=sys.stderr)
            return 2
        return client(argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "model", None) is not None:
            _check_model_folder(args.model)
        args.run(args)
    except SynthgenError as exc:
        print(f"synthgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # what the checks up front cannot foresee: a full disk, a file system that refuses writes
        print(f"synthgen {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
