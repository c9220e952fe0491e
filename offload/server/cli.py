"""offload-serve: an OpenAI-compatible HTTP server (uvicorn + Starlette) over one model.

    offload-serve -m llama3-8b --ctx 128K                  # http://127.0.0.1:8000/v1
    offload-serve --host 0.0.0.0 --api-key "$KEY"          # anything but loopback needs a key

The model, tier, attention and sampling options are offload-chat's own (offload.cli.options: same names, YAML and
OFFLOAD_* variables, llama.cpp's aliases and hints); sampling options are the defaults of requests.
"""
from __future__ import annotations

import ipaddress
import os
import sys
import threading

import click

from offload.cli.options import MODEL_OPTIONS, SAMPLING_OPTIONS, apply_options, build_config, screen_llama_flags
from offload.errors import ConfigError, OffloadError


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int, api_key: str | None) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; pass 0..65535 (8000 is the default)")
    if not _loopback(host) and not api_key:
        raise ConfigError(f"--host {host} would let other machines use the model without a key; pass --api-key KEY "
                          "(or OFFLOAD_API_KEY), or bind 127.0.0.1")


def build_service(cfg, max_tokens: int, max_body: int, queue: int, park_dir, park_mem: int, live: int,
                  served_name: str | None = None, show_progress=None):
    """The LLM (validated before its weights load) and the Service around it."""
    from offload.api import LLM
    from offload.server.protocol import Limits
    from offload.server.service import Service

    def can_serve(llm):
        if llm.tokenizer is None:
            raise ConfigError("this model has no tokenizer (--load-format dummy, or a folder without tokenizer.json); "
                              "serve a model with one")

    llm = LLM(config=cfg, show_progress=show_progress, before_load=can_serve)
    names = tuple(dict.fromkeys(n for n in (served_name, str(cfg.model) if cfg.model else None, llm.name) if n))
    limits = Limits(max_body_bytes=max_body, max_tokens=max_tokens,
                    default_max_tokens=min(cfg.max_new_tokens, max_tokens))
    return Service(llm, names, limits, queue_size=queue, park_dir=park_dir, park_bytes=park_mem, live_max=live)


class Running:
    """A uvicorn server on a thread of this process (tests, benchmarks): url, stop()."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, name="offload-serve", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            self._thread.join(0.02)
        sock = self.server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


def _serve_options(f):
    opts = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; other than loopback "
                     "needs --api-key."),
        click.option("--port", default=8000, type=int, show_default=True, help="TCP port."),
        click.option("--api-key", default=None, envvar="OFFLOAD_API_KEY", help="Clients must send "
                     "'Authorization: Bearer KEY' (env OFFLOAD_API_KEY)."),
        click.option("--served-name", default=None, help="Model id clients pass (also the -m value and the model's name)."),
        click.option("--max-tokens", default=4096, type=click.IntRange(1), show_default=True,
                     help="Most new tokens one request may ask for."),
        click.option("--max-body", default="8MiB", show_default=True, help="Largest request body."),
        click.option("--queue", default=8, type=click.IntRange(1), show_default=True,
                     help="Requests running or waiting; one more gets 429 with Retry-After."),
        click.option("--live", default=2, type=click.IntRange(1), show_default=True,
                     help="Conversations whose KV stays in the tiers; older ones are parked on disk."),
        click.option("--park-dir", default=None, help="Folder for parked conversations (default: a private temp "
                     "folder, removed on exit)."),
        click.option("--park-mem", default="8GiB", show_default=True, help="Disk budget of parked conversations."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("offload-serve", context_settings={"help_option_names": ["-h", "--help"]})
@apply_options(MODEL_OPTIONS)
@apply_options(SAMPLING_OPTIONS)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML file of options (CLI > env OFFLOAD_* > file).")
@_serve_options
def serve_command(host, port, api_key, served_name, max_tokens, max_body, queue, live, park_dir, park_mem,
                  config_path, **flags):
    """Serve a local LLM over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    The sampling options are the defaults of requests that leave them out; -n is the default max_tokens."""
    from offload.config import parse_bytes
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("offload-serve needs Starlette and uvicorn, which are not installed; "
                          "pip install 'offload[serve]'") from None
    check_bind(host, port, api_key)
    cfg = build_config(config_path, flags)
    for line in click.get_current_context().obj or ():   # llama.cpp flags we ignore, noted once options are valid
        click.echo(line, err=True)
    max_body, park_mem = parse_bytes(max_body), parse_bytes(park_mem)
    if park_dir is not None and os.path.exists(park_dir) and not os.path.isdir(park_dir):
        raise ConfigError(f"--park-dir {park_dir} is not a folder; pass a folder (created 0700 if missing)")
    service = build_service(cfg, max_tokens, max_body, queue, park_dir, park_mem, live, served_name)
    from offload.progress import note
    from offload.server.app import create_app
    note(f"offload-serve | model {service.served[0]} | ctx {service.llm.ctx} | {service.llm.device.type} | "
         f"http://{host}:{port}/v1 | queue {queue} | {'key required' if api_key else 'no key (loopback only)'}")
    try:
        # SIGTERM / Ctrl-C: open streams get 5 s, then close (their generations stop), then parked files go
        uvicorn.run(create_app(service, api_key), host=host, port=port, log_level="warning", lifespan="off",
                    timeout_graceful_shutdown=5)
    finally:
        service.close()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    valued = {n for p in serve_command.params if isinstance(p, click.Option) and not p.is_flag
              for n in p.opts + p.secondary_opts}
    try:
        argv, notes = screen_llama_flags(argv, valued)     # llama-server habits: -ngl 99 is noted, not an error
        serve_command.main(args=argv, prog_name="offload-serve", standalone_mode=False, obj=notes)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split()).rstrip('.')}; see offload-serve --help", err=True)
        sys.exit(2)
    except OffloadError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
