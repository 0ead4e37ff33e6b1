"""``fastquant serve``: serve a checkpoint folder on Ray Serve, and ``fastquant serve keys``: manage its API keys.

fastquant serve keys add --api-keys keys.json alice      # prints the new key alone on its last line
fastquant serve keys revoke --api-keys keys.json alice
fastquant serve smollm2-int8 --replicas 2 --port 8000 --metrics-port 8080 --api-keys keys.json

Ray and the serving libraries are imported only when serving starts (``pip install fastquant[serve]``).
"""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

_KEYS_HELP = "CHECKPOINT_DIR, or `keys add NAME` / `keys revoke NAME_OR_ID` / `keys list` to manage --api-keys"


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options come between positionals (`serve keys add --api-keys FILE NAME`): plain argparse takes the
    positionals it sees first in one go and would leave NAME unrecognized."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inner:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_serve_parser(sub: Any) -> None:
    from fastquant.app.serve.config import ServeConfig

    defaults = {f.name: f.default for f in fields(ServeConfig)}
    p = sub.add_parser(
        "serve",
        help="serve a `fastquant compress` folder: OpenAI-compatible API on Ray Serve (pip install fastquant[serve])",
        description=__doc__.split("\n\n")[0],
    )
    p.__class__ = _IntermixedParser  # subparsers build plain parsers; this one only changes how it parses
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help=_KEYS_HELP)
    p.add_argument("keys_args", nargs="*", metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--api-keys", required=True, help="API key file (JSON, hashes only; created by `keys add`)")
    p.add_argument("--replicas", type=int, default=defaults["replicas"])
    p.add_argument("--host", default=defaults["host"], help="HTTP address (%(default)s)")
    p.add_argument("--port", type=int, default=defaults["port"], help="HTTP port (%(default)s)")
    p.add_argument(
        "--metrics-port", type=int, default=defaults["metrics_port"], help="Prometheus port, /metrics (%(default)s)"
    )
    p.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    p.add_argument("--model-name", help="the model's name in the API (default: the folder's name)")
    p.add_argument("--cpus-per-replica", type=float, default=defaults["cpus_per_replica"])
    p.add_argument("--max-body-bytes", type=int, default=defaults["max_body_bytes"])
    p.add_argument("--max-prompt-tokens", type=int, default=defaults["max_prompt_tokens"])
    p.add_argument("--max-tokens-cap", type=int, default=defaults["max_tokens_cap"])
    p.add_argument(
        "--requests-per-minute",
        type=float,
        help=f"per key without its own rate (default {defaults['requests_per_minute']:g}); keys add: the key's own",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=defaults["max_batch_size"],
        help="non-streaming requests sharing one generate call (%(default)s; 1: off)",
    )
    p.add_argument("--trusted-key", action="append", default=[], help="Ed25519 public key (PEM): require a signature")
    p.add_argument("--key-file", help="AES key file of an encrypted checkpoint (else $FASTQUANT_KEY[_FILE])")
    p.add_argument("--audit-log", help="append JSON lines of loads and requests to this file")
    p.add_argument("--audit-prompts", action="store_true", help="also log prompts and outputs (off by default)")
    p.add_argument("--models", nargs="+", help="keys add: the models the key may use (default: all)")
    p.set_defaults(func=cmd_serve, progress=None)


def _keys(args: argparse.Namespace) -> int:
    from fastquant.app.serve import keys

    action, *rest = args.keys_args or ["?"]
    if action == "add" and len(rest) == 1:
        key, entry = keys.add_key(
            args.api_keys, rest[0], models=args.models, requests_per_minute=args.requests_per_minute
        )
        print(f"added key {entry['id']} ({entry['name']}) to {args.api_keys}; it is shown only now:")
        print(key)
        return 0
    if action == "revoke" and len(rest) == 1:
        ids = keys.revoke_key(args.api_keys, rest[0])
        print(f"revoked {', '.join(ids)} in {args.api_keys}")
        return 0
    if action == "list" and not rest:
        for e in keys.read_entries(args.api_keys):
            state = f"revoked {e.get('revoked')}" if e.get("revoked") else "active"
            print(f"{e.get('id')}  {e.get('name')}  models={e.get('models')}  {state}")
        return 0
    raise ValueError("usage: fastquant serve keys add NAME | revoke NAME_OR_ID | list, with --api-keys FILE")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.checkpoint == "keys" and not Path("keys").is_dir():
        return _keys(args)
    if args.keys_args:
        raise ValueError(f"unexpected arguments after {args.checkpoint}: {' '.join(args.keys_args)}")
    try:
        from fastquant.app.serve.app import start
    except ImportError as exc:
        raise ValueError(f"serving needs the serve extra: pip install 'fastquant[serve]' ({exc})") from exc
    from fastquant.app.args import config_from_args
    from fastquant.app.serve.config import ServeConfig

    defaults = {f.name: f.default for f in fields(ServeConfig)}
    config = config_from_args(
        ServeConfig,
        args,
        requests_per_minute=args.requests_per_minute or defaults["requests_per_minute"],
        trusted_keys=tuple(args.trusted_key),
    )
    try:
        url = start(config, address=args.address)
        # A server started in the background by a non-interactive shell inherits SIGINT as ignored (Python then
        # never raises KeyboardInterrupt), and service managers stop a server with SIGTERM: both stop it
        # cleanly. Set after start(): ray.init installs its own SIGTERM handler, which exits at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(f"serving {config.served_name} at {url}/v1 ({config.replicas} replicas); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
