#!/bin/sh
# Entry point of the Flywheel image.
#
# A Ray driver must run on a node of the cluster: `ray.init(address="HEAD:6379")` looks for a
# raylet on its own host. So when the server is started with FLYWHEEL_RAY_ADDRESS set, this
# container first joins the cluster as a node with no CPUs or GPUs (no job is ever scheduled
# on a gateway); set FLYWHEEL_RAY_JOIN=false where the host already runs a Ray node.
# Every other command (migrations, the CLI, `ray start` for head and workers) runs as given.
set -eu

if [ "${1:-}" = "flywheel" ] && [ "${2:-}" = "up" ] \
  && [ -n "${FLYWHEEL_RAY_ADDRESS:-}" ] && [ "${FLYWHEEL_RAY_JOIN:-true}" = "true" ]; then
  ray start --address="${FLYWHEEL_RAY_ADDRESS}" --num-cpus=0 --num-gpus=0 \
    --disable-usage-stats
fi

exec "$@"
