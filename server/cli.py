"""The `softprompt` console script.

softprompt serve --host 127.0.0.1 --port 8000      start the HTTP server
softprompt train --data train.jsonl --init "..." --name sentiment
softprompt eval --data test.jsonl --prompt math-v2 --prompt math-v3 [--text "..."] [--bare]
softprompt prompts list|show|alias|import|export|delete
softprompt worker                                  run jobs from a PostgreSQL store's queue
softprompt models list|install NAME                the named models (default, qwen2.5-coder-0.5b)
"""

from __future__ import annotations

import argparse
import logging
import sys


def _fingerprint(spec: str):
    from core.modeling import load_frozen_model

    frozen = load_frozen_model(spec)
    return frozen.fingerprint, frozen.base_model


def build_parser() -> argparse.ArgumentParser:
    from prompt_store import cli as prompts_cli
    from server.engine.backend import ENGINES
    from trainer import cli as train_cli
    from trainer import eval_cli

    parser = argparse.ArgumentParser(
        prog="softprompt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="area", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (settings from SOFTPROMPT_* env)")
    serve.add_argument("--host", default=None, help="address to bind (overrides SOFTPROMPT_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (overrides SOFTPROMPT_PORT; default 8000)")
    serve.add_argument("--model", default=None, help="model spec (overrides SOFTPROMPT_MODEL)")
    serve.add_argument("--store", default=None, help="store root (overrides SOFTPROMPT_STORE)")
    serve.add_argument(
        "--engine",
        default=None,
        choices=ENGINES,
        help="what computes the rows (overrides SOFTPROMPT_ENGINE; default torch; llamacpp: make install-llamacpp)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="for uvicorn and this server's own logs (the access log is info)",
    )
    train_cli.add_arguments(sub.add_parser("train", help="optimise a soft prompt and publish it"))
    eval_cli.add_arguments(
        sub.add_parser(
            "eval",
            help="score prompts on labeled data and compare them pairwise",
            description=eval_cli.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    prompts_cli.build_parser(sub.add_parser("prompts", help="manage the prompt store"), can_fingerprint=True)
    from core import model_cli, models

    model_cli.add_arguments(
        sub.add_parser(
            "models",
            help="the named models: list them, install one",
            description=models.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from jobs import cli as worker_cli

    worker_cli.add_arguments(
        sub.add_parser(
            "worker",
            help="run training and evaluation jobs from a PostgreSQL store's queue",
            description=worker_cli.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import settings_from

    given = {"model": args.model, "store": args.store, "host": args.host, "port": args.port, "engine": args.engine}
    settings = settings_from("serve", given)
    if settings is None:
        return 2
    # this server's own logs too, not only uvicorn's (uvicorn's "trace" is below debug)
    logging.getLogger().setLevel("DEBUG" if args.log_level == "trace" else args.log_level.upper())
    app = create_app(settings)
    # Requests still running this long after SIGTERM are cut off: a shutdown always finishes.
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
        )
    )
    app.state.stop_server = lambda: setattr(server, "should_exit", True)  # a failed boot ends the process
    server.run()
    state = getattr(app.state, "softprompt", None)
    if state is not None and state.boot_error:  # the boot failed and stopped the server: say why, exit non-zero
        print(f"softprompt serve: the server could not start: {state.boot_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.area == "serve":
        return serve(args)
    if args.area == "train":
        from trainer import cli as train_cli

        return train_cli.run(args)
    if args.area == "worker":
        from jobs import cli as worker_cli

        return worker_cli.run(args)
    if args.area == "models":
        from core import model_cli

        return model_cli.run(args)
    if args.area == "eval":
        from trainer import eval_cli

        return eval_cli.run(args)
    from prompt_store import cli as prompts_cli

    return prompts_cli.run(args, fingerprinter=_fingerprint)


if __name__ == "__main__":
    sys.exit(main())
