#!/usr/bin/env bash
# Set up (once) and start the service on the shipped model store (port 8000); arguments go to `metalora serve`.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# The console's k-NN neighbour pictures: the shipped bundles carry none (they would be copies of the
# data sets' images), so they are made once beside the galleries from ../shared/data where it is
# here (about 30 s the first time; a no-op after). Without them the console shows a labelled
# placeholder per neighbour.
if [ -d "$ROOT/../shared/data" ]; then
  metalora thumbnails --if-available >&2 || echo "serve: gallery thumbnails not made (see above); the console shows placeholders" >&2
fi
exec metalora serve "$@"
