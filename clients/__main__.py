"""`python -m clients`: the `metalora-client` command."""

from .cli import main

main()
