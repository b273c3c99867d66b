"""`fastgate` command line: argparse -> config -> supervisor. No logic here."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys

from . import __version__
from . import cli_keys, cli_store
from . import config as cfg
from .errors import ConfigError

DEFAULT_DATA_DIR = "fastgate-data"


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgate", description="A key-based API gateway.")
    p.add_argument("--version", action="version", version=f"fastgate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway (master + workers)")
    run.add_argument("--config", "-c", help="TOML or YAML config; omitted: the embedded default")
    run.add_argument("--workers", "-w", type=_positive_int, help="worker processes (0 = one per CPU)")
    run.add_argument("--listen", help="HOST:PORT for client traffic (port 0 = any free port)")
    run.add_argument("--admin-listen", help="HOST:PORT for the admin API")
    run.add_argument("--data-dir", default=None, help=f"embedded default only: where data lives (default ./{DEFAULT_DATA_DIR})")
    run.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])

    chk = sub.add_parser("check-config", help="validate a config file and report every problem (exit 2 if any)")
    chk.add_argument("file")

    cli_keys.register(sub)  # keys ..., usage, audit list|verify
    cli_store.register(sub)  # store migrate
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="fastgate[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_check_config(args) -> int:
    try:
        c = cfg.load_config(args.file)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        n = len(exc.problems)
        print(f"{args.file}: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({len(c.routes)} routes, {len(c.upstreams)} upstreams, {len(c.plans)} plans)")
    return 0


def _embedded_admin_token(data_dir: str, env: str) -> str:
    """The embedded default keeps its admin token in a 0600 file in the data
    dir (created once), so the quick start has a working admin API."""
    if os.environ.get(env):
        return f"fastgate: admin token from ${env}"
    path = os.path.join(data_dir, "admin.token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path) as f:
            token = f.read().strip()
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    os.environ[env] = token
    return f"fastgate: admin token in {os.path.abspath(path)} (export {env}=$(cat {path}))"


def cmd_run(args) -> int:
    from . import demo
    from .workers.supervisor import AlreadyRunning, InstanceLock, Supervisor, apply_overrides

    overrides = {}
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.admin_listen is not None:
        overrides["admin_listen"] = args.admin_listen
    extras = []
    banner = []
    try:
        if args.config:
            config = apply_overrides(cfg.load_config(args.config), overrides)
            # One gateway per key store, decided before any socket is bound or key loaded.
            lock = InstanceLock.acquire(config.keys.store)
        else:
            data_dir = args.data_dir or os.environ.get("FASTGATE_DATA", DEFAULT_DATA_DIR)
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            lock = InstanceLock.acquire(cfg.default_config(data_dir, 0).keys.store)
            demo_sock = socket.socket()
            demo_sock.bind(("127.0.0.1", 0))
            demo_sock.listen(128)
            demo_port = demo_sock.getsockname()[1]
            extras.append(("demo upstream", lambda: demo.serve(demo_sock)))
            config = apply_overrides(cfg.default_config(data_dir, demo_port), overrides)
            token_note = _embedded_admin_token(data_dir, config.admin.token_env)
            banner = [token_note,
                f"fastgate: embedded default config: data dir {os.path.abspath(data_dir)}, "
                f"routes '/' (open) and '/secure' (API key, plan 'demo') -> built-in demo upstream "
                f"127.0.0.1:{demo_port}",
                "fastgate: next: curl the address above; make a key with "
                f"`fastgate keys create --name me --plan demo --admin http://{config.admin.listen}` "
                "and send it as x-api-key to /secure; for your own routes write a gateway.toml "
                "(see README) and run: fastgate run --config gateway.toml",
            ]
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except (AlreadyRunning, OSError) as exc:  # another gateway on this store; a lock file we cannot make
        print(f"fastgate: cannot start: {exc}", file=sys.stderr)
        return 1
    _setup_logging(args.log_level or config.log.level)
    from .keys.store import StoreError

    sup = Supervisor(config, args.config, overrides, banner_extra=banner, extras=extras, instance_lock=lock)
    try:
        return sup.run()
    except (OSError, AlreadyRunning, StoreError) as exc:  # StoreError: e.g. [cluster] store unreachable at start
        print(f"fastgate: cannot start: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command in ("keys", "audit", "usage"):
        return cli_keys.run(args)
    if args.command == "store":
        return args.func(args)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
