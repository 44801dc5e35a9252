"""``streampipe deploy``: sign a model and publish it for edges, or roll back."""

from __future__ import annotations

import argparse
import os
from typing import Any

from streampipe.cli.options import DEFAULT_BROKER, add_broker, client_id, positive_int
from streampipe.topics import Topics, check_name

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe deploy`` to the subcommands ``sub``."""
    deploy = sub.add_parser(
        "deploy",
        help="sign a model and publish it for edges to hot-swap to, or roll back",
        description="Sign MODEL_FILE (a pickled River model: from `export-model`, or "
        "pickle.dump) and publish it, retained, on ROOT/models/NAME as the next version; "
        "edges started with --deploy-key and --model-name NAME swap to it between two "
        "messages. The artifact it replaces is kept on ROOT/models/NAME/previous. "
        "MODEL_FILE is unpickled here to check it: deploy only files you made.",
    )
    deploy.add_argument("model_file", nargs="?", metavar="MODEL_FILE", help="pickled model")
    add_broker(deploy, DEFAULT_BROKER)
    deploy.add_argument("--model", metavar="NAME", help="model name (the edges' --model-name)")
    deploy.add_argument(
        "--rollback",
        metavar="NAME",
        help="instead of MODEL_FILE: publish model NAME's previous version again, as a new "
        "version (a second rollback undoes the first)",
    )
    deploy.add_argument(
        "--signing-key",
        metavar="FILE",
        default=os.environ.get("STREAMPIPE_SIGNING_KEY"),
        help="private key (deploy.key from `streampipe keys init`) "
        "(default: $STREAMPIPE_SIGNING_KEY)",
    )
    deploy.add_argument(
        "--devices",
        default="*",
        metavar="PATTERN",
        help="devices the model is for, an fnmatch pattern over device ids "
        "(default: %(default)s, all)",
    )
    deploy.add_argument(
        "--version",
        type=positive_int,
        metavar="N",
        help="version number (default: one more than the highest retained or recorded in "
        "deploy.versions beside --signing-key; 2 for a first deployment)",
    )
    deploy.add_argument("--spec", metavar="SPEC", help="the model's spec, recorded in its header")
    deploy.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker: to connect, for the retained versions, for "
        "acknowledgements (default: %(default)s)",
    )
    deploy.set_defaults(run=run)
    return deploy


def run(args: argparse.Namespace) -> int:
    from streampipe.models.deploy import ModelPublisher, VersionLedger, read_model_file
    from streampipe.models.keys import load_signing_key

    if (args.model_file is None) == (args.rollback is None):
        raise ValueError("give MODEL_FILE (with --model NAME) or --rollback NAME")
    if args.model_file is not None and not args.model:
        raise ValueError("--model NAME is needed: the name edges run the model under")
    if args.rollback is not None and (args.model or args.version or args.spec):
        raise ValueError("--rollback takes no --model, --version or --spec")
    if args.rollback is not None and args.devices != "*":
        raise ValueError("--rollback keeps the previous version's --devices")
    if not args.signing_key:
        raise ValueError("--signing-key FILE is needed (make one with `streampipe keys init`)")
    name = args.rollback or args.model
    check_name(name, "model name")
    key = load_signing_key(args.signing_key)
    model = read_model_file(args.model_file) if args.model_file is not None else None
    topics = Topics(args.topic_root)
    with ModelPublisher(
        args.broker, topics, timeout=args.timeout, client_id=client_id("deploy")
    ) as pub:
        # The versions this deployer published: what is retained can be an old one.
        ledger = VersionLedger.beside(args.signing_key)
        if model is None:
            done = pub.rollback(name, key, ledger=ledger)
        else:
            data, kind = model
            done = pub.deploy(
                data,
                kind,
                name=name,
                key=key,
                version=args.version,
                devices=args.devices,
                spec=args.spec,
                ledger=ledger,
            )
    h = done.header
    what = "rolled back" if model is None else "deployed"
    print(f"{what}: {h.describe()}, {done.size:,} bytes retained on {topics.models(name)}")
    if done.replaced is not None:
        print(
            f"version {done.replaced.version} kept on {topics.previous_model(name)} "
            f"(`streampipe deploy --rollback {name}` goes back to it)"
        )
    return 0
