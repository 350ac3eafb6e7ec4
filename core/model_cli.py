"""`softprompt models list|install NAME`: the named models of core/models.py."""

from __future__ import annotations

import argparse
import sys

from core.models import MODELS, ModelSpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the named models and whether they are installed")
    install = sub.add_parser("install", help="assemble and verify a named model's GGUF, then dequantize it once")
    install.add_argument("name", choices=sorted(MODELS))


def run(args: argparse.Namespace) -> int:
    if args.command == "list":
        for model in MODELS.values():
            state = "installed" if model.installed() else f"not installed ({model.install})"
            print(f"{model.name}: {model.model_id.split(' (')[0]} - {state}")
        return 0
    from core.modeling import load_frozen_model

    model = MODELS[args.name]
    try:
        path = model.ensure()
        frozen = load_frozen_model(model.name, device="cpu")
    except ModelSpecError as error:
        print(f"softprompt models: {error}", file=sys.stderr)
        return 1
    print(
        f"{model.name}: {path} ({path.stat().st_size:,} bytes); loads as {frozen.base_model} in "
        f"{frozen.load_seconds:.1f} s"
    )
    return 0
