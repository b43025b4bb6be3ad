"""The `luna-stack` command: serve one service, run the whole stack locally, write fixtures, status."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from luna_stack.config import load_settings, settings_table
from luna_stack.wire.contract import KINDS
from luna_stack.wire.errors import ConfigError, LunaError

log = logging.getLogger("luna_stack")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(kind: str, config: str | None, host: str | None, port: int | None) -> None:
    from aiohttp import web

    from luna_stack.server.app import SERVER_OPTIONS, create_app

    settings = load_settings(config)
    changes = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if changes:
        settings = settings.with_core(**changes)
    setup_logging(settings.core.log_level)
    module = importlib.import_module(f"luna_stack.{kind}.family")
    service = module.build(settings)
    bind_port = settings.core.port or service.default_port
    app = create_app(service, bind_port)
    log.info(
        "%s service on http://%s:%d (device %s, models under %s)",
        kind,
        settings.core.host,
        bind_port,
        service.device,
        ", ".join(str(r) for r in service.roots.roots),
    )
    web.run_app(
        app, host=settings.core.host, port=bind_port, print=None, shutdown_timeout=10, **SERVER_OPTIONS
    )
    if service.executor.busy:
        # The interpreter would join the compute thread at exit and wait for its forward: leave now.
        logging.shutdown()
        os._exit(0)


def status(urls: list[str], token: str | None, redis_url: str | None = None) -> int:
    """Print the status of the services at `urls`; with none, of the replicas the Redis registry lists
    (authenticated entries only: skipped ones are listed with the reason), else of the default ports."""
    from luna_stack.client.http import AsyncClient
    from luna_stack.wire.contract import DEFAULT_PORTS

    token = token or os.environ.get("LUNA_TOKEN") or None

    async def discover(out: dict[str, object]) -> list[str]:
        from luna_stack.jobs.redis import connect
        from luna_stack.jobs.registry import Registry

        redis = connect(redis_url)
        try:
            registry = Registry(redis, token=token)
            targets, skipped = [], []
            for kind in KINDS:
                live, bad = await registry.entries(kind)
                targets += [replica.url for replica in live]
                skipped += [vars(entry) for entry in bad]
        finally:
            await redis.aclose()
        if skipped:
            out["registry_skipped"] = skipped
        return targets

    async def collect() -> dict[str, object]:
        out: dict[str, object] = {}
        if urls:
            targets = urls
        elif redis_url:
            targets = await discover(out)
        else:
            targets = [f"http://127.0.0.1:{port}" for port in DEFAULT_PORTS.values()]
        for url in targets:
            async with AsyncClient("vae", url=url, token=token) as client:
                try:
                    out[url] = await client.status()
                except LunaError as exc:
                    out[url] = {"error": str(exc)}
        return out

    print(json.dumps(asyncio.run(collect()), indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luna-stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="serve one model service")
    p_serve.add_argument("kind", choices=KINDS)
    p_serve.add_argument("--config", help="YAML config file (default: $LUNA_CONFIG)")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)

    p_run = sub.add_parser("run", help="run redis and the services as local processes (no Docker)")
    p_run.add_argument("--demo", action="store_true", help="write small random-weight models first")
    p_run.add_argument(
        "--models", help="models directory in ComfyUI layout (default: $LUNA_MODEL_ROOTS or ./models)"
    )
    p_run.add_argument("--services", help="comma-separated kinds to start (default: every available service)")
    p_run.add_argument("--config", help="YAML config file passed to every service")
    p_run.add_argument("--state-dir", default=".luna", help="where local redis keeps its data and logs")
    p_run.add_argument(
        "--base-port", type=int, default=8100, help="clip = base+1, vae = base+2, unet = base+3"
    )

    p_fix = sub.add_parser("fixtures", help="write random-weight models in ComfyUI layout")
    p_fix.add_argument("--out", required=True, type=Path)
    p_fix.add_argument("--size", choices=("small", "full"), default="small")
    p_fix.add_argument("--families", default="sd15,sdxl")

    p_status = sub.add_parser("status", help="print the status of running services")
    p_status.add_argument(
        "urls", nargs="*", help="service URLs (default: the replicas in the Redis registry, else local ports)"
    )
    p_status.add_argument("--token", help="bearer token (default: $LUNA_TOKEN)")
    p_status.add_argument("--redis", help="Redis URL of the registry (default: $LUNA_REDIS_URL)")

    sub.add_parser("config", help="print every configuration key as a markdown table")
    sub.add_parser(
        "convert", help="write an fp8 or GGUF copy of a UNet (see `luna-stack convert -h`)", add_help=False
    )

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:  # the UNet package owns its converter's arguments
        from luna_stack.unet.convert import main as convert_main

        return convert_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(args.kind, args.config, args.host, args.port)
            return 0
        if args.command == "run":
            from luna_stack.devtools.localrun import run_local

            setup_logging("info")
            services = args.services.split(",") if args.services else None
            return run_local(
                demo=args.demo,
                models=args.models,
                services=services,
                config=args.config,
                state_dir=Path(args.state_dir),
                base_port=args.base_port,
            )
        if args.command == "fixtures":
            from luna_stack.devtools.fixtures import main_fixtures

            setup_logging("info")
            return main_fixtures(args.out, size=args.size, families=tuple(args.families.split(",")))
        if args.command == "status":
            return status(args.urls, args.token, args.redis or os.environ.get("LUNA_REDIS_URL"))
        if args.command == "config":
            print(settings_table())
            return 0
    except ConfigError as exc:
        print(f"luna-stack: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
