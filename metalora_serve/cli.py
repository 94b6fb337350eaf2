"""`metalora`: one command line over every layer, composed here so no layer imports the ones above it.

The model library (`metalora.cli`: predict, eval-imagenet, train, eval, export-onnx, bench-onnx),
the service (`service.cli`: serve) and the benchmarks (`bench.cli`: bench) each keep a Typer app
of their own; this module registers their commands, flat, under one app, and fills the library
commands' environment defaults (`metalora_serve.settings`). The three modules import torch and
the rest only inside their commands, so `metalora --help` starts in well under a second.
"""

from __future__ import annotations

import typer

from bench.cli import app as bench_app
from metalora.cli import app as library_app
from service.cli import app as service_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MetaLoRA Serve: one frozen backbone, many input-conditioned adapters.")
for part in (library_app, service_app, bench_app):
    app.registered_commands.extend(part.registered_commands)

# The commands whose option defaults come from the environment (CommandSettings.default_map).
_ENV_DEFAULTS = ("train", "eval", "cache-features", "thumbnails", "bench-onnx")


@app.callback()
def _environment_defaults(ctx: typer.Context) -> None:
    # Runs before the command's own context is made, so its options see these defaults
    # (and its --help shows them); a value on the command line still wins.
    if ctx.invoked_subcommand in _ENV_DEFAULTS:
        from .settings import CommandSettings

        ctx.default_map = {**CommandSettings().default_map(), **(ctx.default_map or {})}


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
