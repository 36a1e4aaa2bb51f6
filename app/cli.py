"""The `synthgen` command line: train, generate, evaluate, serve and dataset."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from app import __version__
from app.errors import InvalidInputError, SynthgenError
from app.sampling import resolve_label


def _train(args: argparse.Namespace) -> None:
    from app.training import TrainOptions, train

    hyperparameters = json.loads(args.hparams) if args.hparams else {}
    summary = train(TrainOptions(arch=args.arch, data=args.data, out=Path(args.out), epochs=args.epochs,
                                 seed=args.seed, device=args.device, resume=args.resume, batch_size=args.batch_size,
                                 lr=args.lr if args.lr else (2e-4 if args.arch == "gan" else 1e-3),
                                 val_fraction=args.val_fraction, hyperparameters=hyperparameters,
                                 progress=not args.quiet))
    print(json.dumps(summary, indent=2, sort_keys=True))


def _generate(args: argparse.Namespace) -> None:
    from app.checkpoint import load_model
    from app.export import write_output
    from app.sampling import per_class_labels, sample
    from app.training import resolve_device

    model = load_model(args.model, resolve_device(args.device))
    if (args.per_class is None) == (args.n is None):
        raise InvalidInputError("give exactly one of --per-class N or --n N")
    count = args.per_class if args.per_class is not None else args.n
    if count < 1:
        raise InvalidInputError("--per-class / --n must be at least 1")
    if args.per_class is not None:
        if args.label is not None:
            raise InvalidInputError("--label goes with --n, not with --per-class")
        if not model.num_classes:
            raise InvalidInputError(f"{model.name} is unconditional; use --n")
        labels: list[int | None] = list(per_class_labels(model.num_classes, args.per_class))
    else:
        label = resolve_label(args.label, model.class_names) if args.label is not None else None
        labels = [label] * args.n
    images, drawn = sample(model, args.seed, labels, truncation=args.truncation)
    manifest = {"model": model.name, "config_hash": model.config_hash, "truncation": args.truncation,
                "code_version": __version__}
    write_output(Path(args.out), images, drawn, model.class_names, args.seed, manifest)
    print(f"wrote {len(images)} samples of {model.name} to {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    from app.evaluation import evaluate

    card = evaluate(Path(args.model), args.data, test_spec=args.test_data, per_class=args.per_class, seed=args.seed,
                    device=args.device, progress=not args.quiet)
    print(json.dumps(card["metrics"], indent=2, sort_keys=True))


def _serve(args: argparse.Namespace) -> None:
    import uvicorn
    from pydantic import ValidationError

    from app.api.app import create_app
    from app.settings import Settings

    overrides = {key: value for key, value in (("models_dir", args.models_dir), ("device", args.device)) if value}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise InvalidInputError(f"invalid settings: {exc}") from exc
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level)


def _dataset(args: argparse.Namespace) -> None:
    import httpx

    from app.client import Client, SynthgenClientError

    if (args.per_class is None) == (args.n is None):
        raise InvalidInputError("give exactly one of --per-class N or --n N")
    request = {key: value for key, value in (("per_class", args.per_class), ("n", args.n), ("label", args.label),
                                             ("seed", args.seed), ("min_confidence", args.min_confidence))
               if value is not None}
    try:
        with Client(args.server, api_key=args.api_key or os.environ.get("SYNTHGEN_API_KEY")) as client:
            path = client.download_dataset(args.model, args.out, max_similarity=args.max_similarity, **request)
    except SynthgenClientError as exc:
        raise InvalidInputError(f"the server refused: {exc}") from exc
    except httpx.TransportError as exc:
        raise InvalidInputError(f"cannot reach {args.server}: {exc}") from exc
    print(f"wrote {path}")


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
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument("--hparams", default=None, help='JSON hyper-parameter overrides, e.g. \'{"latent_dim": 32}\'')
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    generate = commands.add_parser("generate",
                                   help="write samples to .npz, .zip, a .png grid or an ImageFolder directory")
    generate.add_argument("--model", required=True, help="model folder, e.g. models/mnist-cgan")
    generate.add_argument("--per-class", type=int, default=None, help="N samples of every class")
    generate.add_argument("--n", type=int, default=None, help="N samples (with --label, all of that class)")
    generate.add_argument("--label", default=None, help="class name or index (with --n)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--truncation", type=float, default=1.0, help="latent scale: GAN ψ, VAE temperature")
    generate.add_argument("--out", required=True, help="PATH.npz, PATH.zip, PATH.png (a grid) or a directory")
    generate.add_argument("--device", default="auto")
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser("evaluate", help="measure a model and write its card.json")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True, help="the training data SPEC (split as in training)")
    evaluate.add_argument("--test-data", default=None, help="real data no training saw, for held-out scores")
    evaluate.add_argument("--per-class", type=int, default=1000, help="synthetic samples per class")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(run=_evaluate)

    serve = commands.add_parser("serve", help="serve the model repository over HTTP (settings: SYNTHGEN_* env)")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--models-dir", default=None, help="overrides SYNTHGEN_MODELS_DIR (default: models)")
    serve.add_argument("--device", default=None, help="overrides SYNTHGEN_DEVICE: auto, cpu, cuda or cuda:N")
    serve.set_defaults(run=_serve)

    dataset = commands.add_parser("dataset", help="have a synthgen server generate a dataset and download it")
    dataset.add_argument("--server", default=os.environ.get("SYNTHGEN_SERVER", "http://127.0.0.1:8000"))
    dataset.add_argument("--api-key", default=None, help="or SYNTHGEN_API_KEY")
    dataset.add_argument("--model", required=True)
    dataset.add_argument("--per-class", type=int, default=None)
    dataset.add_argument("--n", type=int, default=None)
    dataset.add_argument("--label", default=None)
    dataset.add_argument("--seed", type=int, default=None)
    dataset.add_argument("--min-confidence", type=float, default=None)
    dataset.add_argument("--max-similarity", action="store_true")
    dataset.add_argument("--out", required=True, help="PATH.zip, PATH.tar or PATH.npz")
    dataset.set_defaults(run=_dataset)

    commands.add_parser("bench", help="benchmark against the raw model, LitServe and plain FastAPI (--quick: CI)",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: python -m app.bench.run --help
        from app.bench.run import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SynthgenError as exc:
        print(f"synthgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
