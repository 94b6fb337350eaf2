#!/usr/bin/env bash
# Set up (once) and start the service on the shipped model store (port 8000); arguments go to `metalora serve`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec metalora serve "$@"
