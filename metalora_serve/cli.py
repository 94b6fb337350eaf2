"""`metalora`: one command line over every layer, composed here so no layer imports the ones above it.

The model library (`metalora.cli`: predict, eval-imagenet, train, eval, export-onnx, bench-onnx),
the service (`service.cli`: serve) and the benchmarks (`bench.cli`: bench) each keep a Typer app
of their own; this module registers their commands, flat, under one app.
"""

from __future__ import annotations

import typer

from bench.cli import app as bench_app
from metalora.cli import app as library_app
from service.cli import app as service_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA Serve: one frozen backbone, many input-conditioned adapters.")
for part in (library_app, service_app, bench_app):
    app.registered_commands.extend(part.registered_commands)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
