"""`softprompt prompts ...`: list, show, alias, import, export and delete stored prompts, and
migrate a folder store into PostgreSQL."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from core.fingerprint import ModelFingerprint
from core.settings import CommonSettings
from prompt_store.errors import PromptStoreError
from prompt_store.open import open_store

# Given a model spec, returns (fingerprint, base model id). The store cannot load models
# itself (imports flow prompt_store <- trainer); the `softprompt` CLI passes one in.
Fingerprinter = Callable[[str], tuple[ModelFingerprint, str]]


def build_parser(
    parser: argparse.ArgumentParser | None = None, *, can_fingerprint: bool = False
) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="softprompt prompts", description=__doc__)
    parser.add_argument(
        "--store",
        default=str(CommonSettings().store),
        help="store root (default: $SOFTPROMPT_STORE or ./prompt-store)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="names, versions and aliases")
    show = sub.add_parser("show", help="metadata of one version (name, name-vN or alias)")
    show.add_argument("ref")
    alias = sub.add_parser("alias", help="point an alias at a version, or remove it with --remove")
    alias.add_argument("alias")
    alias.add_argument("ref", nargs="?", help="version to point at (e.g. math-v2)")
    alias.add_argument("--remove", action="store_true", help="remove the alias")
    imp = sub.add_parser("import", help="publish a PEFT prompt-tuning adapter folder as a new version")
    imp.add_argument("folder")
    imp.add_argument("--name", required=True)
    if can_fingerprint:
        imp.add_argument(
            "--model",
            default=None,
            help="model spec to fingerprint against (default: record the hidden size only)",
        )
    exp = sub.add_parser("export", help="copy a version's PEFT adapter folder out of the store")
    exp.add_argument("ref")
    exp.add_argument("destination")
    delete = sub.add_parser("delete", help="delete a version (name-vN) or all versions of a name")
    delete.add_argument("ref")
    delete.add_argument("--force", action="store_true", help="also delete versions aliases point at")
    migrate = sub.add_parser("migrate", help="copy a folder store into a PostgreSQL store and verify the copy")
    migrate.add_argument("--from", dest="source", required=True, help="the folder store to copy")
    migrate.add_argument(
        "--to",
        dest="target",
        required=True,
        help="postgresql://user@host:port/database (a password: PGPASSWORD or ~/.pgpass keep it off the command line)",
    )
    migrate.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace, fingerprinter: Fingerprinter | None = None) -> int:
    if args.command == "migrate":
        return _migrate(args)
    try:
        store = open_store(args.store)
    except PromptStoreError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    with store:
        return _run(store, args, fingerprinter)


def _run(store, args: argparse.Namespace, fingerprinter: Fingerprinter | None) -> int:
    try:
        if args.command == "list":
            by_name, aliases = store.catalog()
            for name, versions in by_name.items():
                listed = ", ".join(f"v{v.id.version}" for v in versions)
                print(f"{name}: {listed} (latest {versions[-1].id})")
            for alias, target in sorted(aliases.items()):
                print(f"{alias} -> {target}")
        elif args.command == "show":
            version = store.resolve(args.ref)
            where = {"path": str(version.path)} if version.path is not None else {"store": store.location}
            print(json.dumps({**where, **version.meta, "evaluations": store.evaluations(version)}, indent=2))
        elif args.command == "alias":
            if args.remove:
                store.remove_alias(args.alias)
                print(f"removed alias {args.alias}")
            elif not args.ref:
                print("alias needs a version to point at (or --remove)", file=sys.stderr)
                return 2
            else:
                print(f"{args.alias} -> {store.set_alias(args.alias, args.ref)}")
        elif args.command == "import":
            fingerprint = base_model = None
            if getattr(args, "model", None) is not None and fingerprinter is not None:
                fingerprint, base_model = fingerprinter(args.model)
            version = store.import_adapter(args.folder, args.name, fingerprint=fingerprint, base_model=base_model)
            print(f"imported {args.folder} as {version.id}")
        elif args.command == "export":
            print(f"exported to {store.export(args.ref, args.destination)}")
        elif args.command == "delete":
            deleted = store.delete(args.ref, force=args.force)
            print("deleted " + ", ".join(map(str, deleted)))
    except PromptStoreError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from core.settings import is_database_url
    from prompt_store.copy import copy_store
    from prompt_store.folder import FolderStore

    if not is_database_url(args.target):
        print("migrate: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    if is_database_url(args.source) or not (Path(args.source) / "prompts").is_dir():
        print(
            f"migrate: --from must be a folder store (a folder with prompts/ in it), got {args.source!r}",
            file=sys.stderr,
        )
        return 2
    try:
        with open_store(args.target) as target:
            report = copy_store(FolderStore(args.source), target, progress=not args.no_progress)
            print(f"copied {report} from {args.source} to {target.location}; verified")
    except PromptStoreError as exc:
        print(f"error ({exc.code}): {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))
