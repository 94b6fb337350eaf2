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
# The shipped store keeps its v1 bundles beside the newer ones and the docs ask for them by version
# (cifar10@1, mnist@1): serve every whole version unless told otherwise (the server's own default,
# as Triton's, is "latest 1"; docs/deploy.md, "Publishing a new version").
export METALORA_VERSION_POLICY="${METALORA_VERSION_POLICY:-all}"
exec metalora serve "$@"
