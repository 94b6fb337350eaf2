"""`metalora serve`: the HTTP service under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from .settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA Serve: the HTTP service.")


@app.command()
def serve(
    store: Annotated[Optional[Path], typer.Option(help="model store [env METALORA_STORE; default: the repository's model_store/]")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address [env METALORA_HOST; default 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port [env METALORA_PORT; default 8000]")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(help="Open Inference Protocol gRPC port, 0 = off [env METALORA_GRPC_PORT; default 8001]")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|cuda [env METALORA_DEVICE; default auto]")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto|torch|onnx [env METALORA_BACKEND; default auto: onnx on CPU, torch on CUDA]")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto|fp32|int8|bf16: the shared prefix on the ONNX CPU backend [env METALORA_PRECISION; default fp32; auto = the fastest one whose start-up accuracy check passes]")] = None,
):
    """Run the HTTP service (every setting also reads METALORA_* env vars; see docs/api.md).

    A METALORA_* variable that no setting reads stops it with one line and exit code 1."""
    from pydantic import ValidationError

    from .settings import Settings, UnknownSetting, check_environment

    try:
        check_environment()
    except UnknownSetting as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    given = {k: v for k, v in dict(store=store, host=host, port=port, grpc_port=grpc_port, device=device, backend=backend, precision=precision).items() if v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        preflight(settings)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    taken = ports_taken(settings)
    if taken:
        for line in taken:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1)
    run_server(settings)


def ports_taken(settings: Settings) -> list[str]:
    """One line per port the server would listen on that cannot be had now, naming the setting
    that chose it: a second instance on one host stops here, before it loads anything."""
    import errno
    import socket

    out = []
    for what, port, setting in (("HTTP", settings.port, "METALORA_PORT (--port)"), ("gRPC", settings.grpc_port, "METALORA_GRPC_PORT (--grpc-port)")):
        if not port:
            continue
        host = settings.host.strip("[]")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC bind: a port in TIME_WAIT is free
            try:
                sock.bind((host, port))
            except OSError as e:
                why = "the port is in use" if e.errno == errno.EADDRINUSE else f"{e.strerror.lower()} (is the address this host's?)"
                off = ", or 0 to turn gRPC off" if what == "gRPC" else ""
                out.append(f"{what} could not bind {address}: {why}; set {setting} to a free port{off}")
    return out


def preflight(settings: Settings) -> None:
    """What can be refused before the server starts, with the setting to change: a precision the
    backend, device or CPU cannot run, and calibration images that are not there. Raises
    ValueError. (What needs the model, such as building the graphs, fails the start itself.)"""
    from metalora.backends import lowp
    from metalora.backends.base import resolve_backend
    from metalora.backends.calib import calibration_sources
    from metalora.runtime import pick_device

    try:
        device = pick_device(settings.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    try:
        backend = resolve_backend(settings.backend, device)
    except (ImportError, RuntimeError, ValueError) as e:
        raise ValueError(f"--backend {settings.backend}: {e}") from None
    p = settings.precision
    why = lowp.refused(p, backend, device)
    if why:
        raise ValueError(why)
    if p in ("int8", "auto") and backend != "torch" and settings.calibration_data:
        try:
            if not calibration_sources(calibration=settings.calibration):
                raise ValueError("it names no images")
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"METALORA_CALIBRATION_DATA={settings.calibration_data!r}: {e}") from None



def run_server(settings: Settings) -> None:
    """Run the app under uvicorn with the settings' host, port and log level."""
    import uvicorn

    from .http.app import create_app

    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=10)


if __name__ == "__main__":  # python -m service.cli: this layer's commands only; `metalora` (metalora_serve.cli) has them all
    app()
