#!/usr/bin/env bash
# Set up (once) and run the whole test suite; extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m pytest "$@"
