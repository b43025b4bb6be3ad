"""The `luna-stack` command: serve one service, run the whole stack locally, write fixtures, status."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from luna_stack.config import load_settings, settings_table
from luna_stack.wire.contract import KINDS
from luna_stack.wire.errors import ConfigError

log = logging.getLogger("luna_stack")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(kind: str, config: str | None, host: str | None, port: int | None) -> None:
    from aiohttp import web

    from luna_stack.devtools.supervisor import die_with_supervisor
    from luna_stack.server.app import SERVER_OPTIONS, create_app

    die_with_supervisor()  # started by `luna-stack run`: stop when it does
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


def _registry_targets(redis_url: str, token: str | None) -> tuple[list[tuple[str | None, str]], list[dict]]:
    """The replicas the Redis registry lists, authenticated entries only, and the skipped ones with why."""
    from luna_stack.jobs.redis import connect
    from luna_stack.jobs.registry import Registry

    async def discover() -> tuple[list[tuple[str | None, str]], list[dict]]:
        redis = connect(redis_url)
        try:
            registry = Registry(redis, token=token)
            targets: list[tuple[str | None, str]] = []
            skipped: list[dict] = []
            for kind in KINDS:
                live, bad = await registry.entries(kind)
                targets += [(kind, replica.url) for replica in live]
                skipped += [vars(entry) for entry in bad]
            return targets, skipped
        finally:
            await redis.aclose()

    return asyncio.run(discover())


def _targets(urls: list[str], state_dir: Path) -> list[tuple[str | None, str]]:
    """(expected kind, URL): the given URLs; else those of a running `luna-stack run` (its state file);
    else the default local ports."""
    from luna_stack.wire.contract import DEFAULT_PORTS

    if urls:
        return [(None, url.rstrip("/")) for url in urls]
    state_file = state_dir / "stack.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        try:
            os.kill(int(state["pid"]), 0)
        except (OSError, ValueError, KeyError):
            pass  # that run is gone
        else:
            return list(state["services"].items())
    return [(kind, f"http://127.0.0.1:{port}") for kind, port in DEFAULT_PORTS.items()]


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _row(expected: str | None, url: str, body: dict[str, Any] | None, error: str | None) -> dict[str, str]:
    if body is None:
        return {"service": expected or "?", "url": url, "state": f"DOWN ({error})"}
    models = body.get("models", [])
    weights = sum(m.get("bytes", 0) for m in models)
    gpu = next(
        (g for g in body.get("gpu", {}).get("gpus", []) if g.get("uuid") == body.get("gpu_uuid")), None
    )
    if gpu is not None:
        place = f"GPU {gpu['index']} {_bytes(gpu['memory_used_bytes'])}/{_bytes(gpu['memory_total_bytes'])}"
    else:
        place = f"{body.get('device', '?')} rss {_bytes(body.get('process', {}).get('rss_bytes'))}"
    queue = body.get("queue", {})
    jobs = sum(v for k, v in queue.items() if k != "batching" and isinstance(v, int))
    return {
        "service": str(body.get("service", expected or "?")),
        "url": url,
        "state": "ready" if body.get("ready") else "loading",
        "models": ", ".join(m.get("name", "?") for m in models) or "none loaded",
        "memory": f"weights {_bytes(weights)}, {place}",
        "queue": f"{queue.get('batching', 0)} batching, {jobs} jobs",
    }


def _table(rows: list[dict[str, str]]) -> str:
    columns = ["service", "url", "state", "models", "memory", "queue"]
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def _get_status(url: str, token: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """GET /v1/status with the standard library (no torch to import: the command answers at once)."""
    request = urllib.request.Request(url + "/v1/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp), None
    except urllib.error.HTTPError as err:
        if err.code == 401:
            return None, "needs the token: --token or LUNA_TOKEN"
        return None, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, OSError) and reason.errno:
            return None, os.strerror(reason.errno).lower()
        return None, str(reason)


def status(urls: list[str], token: str | None, state_dir: Path, as_json: bool, redis_url: str | None) -> int:
    """One table (or --json) of every service; exit status 1 unless every one answers and is ready."""
    skipped: list[dict] = []
    if redis_url and not urls:
        targets, skipped = _registry_targets(redis_url, token)
    else:
        targets = _targets(urls, state_dir)
    found = [(expected, url, *_get_status(url, token)) for expected, url in targets]
    rows = [_row(*entry) for entry in found]
    healthy = all(r["state"] == "ready" for r in rows)
    if as_json:
        services = [
            {"service": r["service"], "url": url, "state": r["state"].split(" ")[0]}
            | ({"status": body} if body is not None else {"error": error})
            for r, (_expected, url, body, error) in zip(rows, found, strict=True)
        ]
        out = {"ok": healthy, "services": services}
        print(json.dumps(out | ({"registry_skipped": skipped} if skipped else {}), indent=2, default=str))
    else:
        print(_table(rows))
        for entry in skipped:
            print(f"skipped registry entry: {entry}")
    return 0 if healthy else 1


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
    p_run.add_argument(
        "--auto-ports", action="store_true", help="any free ports instead (`luna-stack status` finds them)"
    )

    p_fix = sub.add_parser("fixtures", help="write random-weight models in ComfyUI layout")
    p_fix.add_argument("--out", required=True, type=Path)
    p_fix.add_argument("--size", choices=("small", "full"), default="small")
    p_fix.add_argument("--families", default="sd15,sdxl")

    p_status = sub.add_parser(
        "status", help="one table of the services (exit status 1 when one is down or not ready)"
    )
    p_status.add_argument(
        "urls",
        nargs="*",
        help="service URLs (default: the Redis registry's replicas with --redis, else those of "
        "`luna-stack run`, else the default ports)",
    )
    p_status.add_argument("--token", default=os.environ.get("LUNA_TOKEN"), help="default: $LUNA_TOKEN")
    p_status.add_argument("--redis", help="Redis URL of the registry (default: $LUNA_REDIS_URL)")
    p_status.add_argument("--json", action="store_true", help="every service's /v1/status as JSON")
    p_status.add_argument("--state-dir", default=".luna", help="where `luna-stack run` keeps its state")

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
                auto_ports=args.auto_ports,
            )
        if args.command == "fixtures":
            from luna_stack.devtools.fixtures import main_fixtures

            setup_logging("info")
            return main_fixtures(args.out, size=args.size, families=tuple(args.families.split(",")))
        if args.command == "status":
            redis_url = args.redis or os.environ.get("LUNA_REDIS_URL")
            return status(args.urls, args.token, Path(args.state_dir), args.json, redis_url)
        if args.command == "config":
            print(settings_table())
            return 0
    except ConfigError as exc:
        print(f"luna-stack: {exc}", file=sys.stderr)  # which key (or port) and how to fix it
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
