#!/bin/sh
# The study's driver (compose service `tuner`): `docker compose run --rm tuner [options of
# hpn-tune run]`. A Ray driver that joins by GCS address (host:6379) must run on a Ray node,
# so this container first joins the cluster as a node without CPUs or GPUs (no trial lands
# here), then runs the study with its state and embedding cache on the shared volume.
set -eu
head="${RAY_HEAD_ADDRESS:-ray-head:6379}"
ray start --address="$head" --num-cpus=0 --num-gpus=0 --disable-usage-stats >/dev/null
# Inside the container only: `ray stop` ends this container's Ray processes.
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
hpn-tune run --address "$head" --tracking-uri "${MLFLOW_TRACKING_URI:-http://mlflow:5000}" \
    --storage-path "${HPN_STORAGE_PATH:-/shared/ray_results}" \
    --set "encoder.cache_dir=${HPN_CACHE_DIR:-/shared/hpn_cache}" "$@"
