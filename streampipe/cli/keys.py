"""``streampipe keys init``: the key pair that signs deployed models."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe keys`` to the subcommands ``sub``."""
    keys = sub.add_parser(
        "keys",
        help="make the key pair that signs deployed models",
        description="The Ed25519 key pair that signs models: `streampipe deploy "
        "--signing-key` signs with its private key, and edges started with --deploy-key "
        "accept only models signed with it. `streampipe keys init DIR` makes a pair; nothing "
        "is published.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_init = keys_sub.add_parser(
        "init",
        help="make an Ed25519 key pair: DIR/deploy.key (private, 0600), DIR/deploy.pub",
        description="Make an Ed25519 key pair for signing models: DIR/deploy.key, the "
        "private key (mode 0600), for `streampipe deploy --signing-key`, kept on the "
        "operator's machine; DIR/deploy.pub, the public key, for every `streampipe edge "
        "--deploy-key`.",
    )
    keys_init.add_argument("dir", metavar="DIR", help="directory to write the two files in")
    keys_init.add_argument("--force", action="store_true", help="replace an existing pair")
    keys.set_defaults(run=run)
    return keys


def run(args: argparse.Namespace) -> int:
    from streampipe.models.keys import init_keys

    pair = init_keys(args.dir, force=args.force)
    q = shlex.quote
    print(
        f"Ed25519 key pair {pair.key_id} made:\n"
        f"  {pair.private}  private (mode 0600): signs models; keep it on this machine\n"
        f"  {pair.public}  public: give it to every edge\n\n"
        "Next:\n"
        f"  streampipe edge --deploy-key {q(str(pair.public))} --model-name NAME ...\n"
        f"  streampipe deploy MODEL_FILE --model NAME --signing-key {q(str(pair.private))} ..."
    )
    return 0
