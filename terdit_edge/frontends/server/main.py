"""The `terdit-edge serve` command: load the model on the worker thread and run uvicorn."""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys

from ...errors import TerditError
from ...settings import GenerationSettings
from .jobs import JobManager, Limits

LOOPBACK_NAMES = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port); the caller reads the port from it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TerditError(f"cannot resolve --host {host!r}: {e}") from None
    family, kind, proto, _, addr = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then (else Nagle's
    # algorithm and delayed ACKs add ~40 ms to every response sent in two writes)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise TerditError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def build(model=None, backend="auto", settings: GenerationSettings | None = None, threads=None, api_keys=None,
          limits: Limits | None = None, state_dir: str | None = None):
    """(manager, app) for a model path (None: the bundled model); the manager starts with the app.
    ``settings``: the model settings (activations) every request runs with. ``state_dir``: keep
    accepted jobs in a JobStore there (None: in memory only)."""
    settings = settings or GenerationSettings()
    from ...pipeline import Pipeline, default_model_path
    from .app import create_app

    path = model if model is not None else default_model_path()
    if not os.path.exists(path):
        raise TerditError(f"model file {path!r} does not exist")

    def loader():
        return Pipeline.load(path, backend=backend, threads=threads, settings=settings)

    store = None
    if state_dir is not None:
        from .store import JobStore

        store = JobStore(state_dir)
    manager = JobManager(loader, limits or Limits(), model_name=os.path.basename(path), settings=settings, store=store)
    return manager, create_app(manager, api_keys, backend=backend)


def serve_command(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise TerditError(f"`terdit-edge serve` needs the server extra ({e.name} is missing): "
                          "pip install \"terdit-edge[server]\" (from a checkout: pip install \".[server]\")") from None
    import uvicorn

    from .app import read_key_file

    keys = read_key_file(args.api_key_file) if args.api_key_file else None
    limits = Limits(max_queue=args.max_queue, max_batch=args.max_batch, max_n=args.max_n, max_steps=args.max_steps,
                    keep_seconds=args.keep_seconds, keep_jobs=args.keep_jobs, batch_wait=args.batch_wait_ms / 1000,
                    max_upload_bytes=getattr(args, "max_upload_bytes", 16 * 1024 * 1024),
                    max_image_pixels=getattr(args, "max_image_pixels", 4096 * 4096))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not _is_loopback(args.host) and keys is None:
        print(f"terdit-edge serve: WARNING: listening on {args.host}, reachable from other machines, without an "
              "API key: anyone who can connect can use the server; pass --api-key-file FILE", file=sys.stderr)
    if args.ephemeral and args.state_dir:
        raise TerditError("--ephemeral keeps no state: it cannot be used with --state-dir")
    from .store import default_state_dir

    state_dir = None if args.ephemeral else (args.state_dir or default_state_dir())
    manager, app = build(args.model, args.backend, GenerationSettings.from_args(args), args.threads, keys, limits,
                         state_dir=state_dir)
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"terdit-edge serve: listening on http://{shown}:{port} (model {manager.model_name}, "
          f"max batch {limits.max_batch}, auth {'on' if keys else 'off'}, jobs "
          f"{'in memory only (--ephemeral)' if state_dir is None else 'kept in ' + state_dir}); the model loads in the "
          "background",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                            timeout_graceful_shutdown=3, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it captured
        pass
    print("terdit-edge serve: stopped", file=sys.stderr)
    return 0
