#!/bin/sh
# Entry point of the cupynn GPU image.
#   no arguments: a short self-check (the CUDA kernels against the NumPy backend), then the
#                 seed benchmark;
#   arguments:    run them, e.g.  nsys profile -o /out/seed python -m cupynn bench seed --profile
set -e
if [ "$#" -eq 0 ]; then
    python -m cupynn selfcheck
    exec python -m cupynn bench seed
fi
exec "$@"
