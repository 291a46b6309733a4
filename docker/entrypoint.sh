#!/bin/sh
# The images' entrypoint: `head` starts a Ray head, `worker` joins one at $RAY_HEAD_ADDRESS
# (host:6379); anything else runs as given. Extra arguments go to `ray start`. KubeRay sets its
# own container command, which takes the place of this one.
set -eu
case "${1:-}" in
head)
    shift
    exec ray start --head --block --dashboard-host=0.0.0.0 --metrics-export-port=8080 "$@"
    ;;
worker)
    shift
    exec ray start --block --address="${RAY_HEAD_ADDRESS:?set RAY_HEAD_ADDRESS to the head, e.g. head:6379}" "$@"
    ;;
*)
    exec "$@"
    ;;
esac
