#!/bin/bash
# Print the container engine to use: the first of $CONTAINER_ENGINE (default "docker podman")
# whose daemon answers. A CLI that is installed but cannot reach its daemon (`docker info`
# fails) does not count. When none works: the reason for each on stderr, exit status 1.
set -uo pipefail
read -ra candidates <<< "${CONTAINER_ENGINE:-docker podman}"
why=()
for engine in "${candidates[@]}"; do
  if ! command -v "$engine" >/dev/null 2>&1; then
    why+=("$engine: not installed")
    continue
  fi
  if err=$(timeout 20 "$engine" info 2>&1 >/dev/null); then
    echo "$engine"
    exit 0
  fi
  why+=("$engine: installed, but '$engine info' fails: $(head -n 1 <<< "$err")")
done
{
  echo "${0##*/}: no working container engine, so no image can be built or loaded here:"
  printf '  %s\n' "${why[@]}"
  echo "Start the Docker daemon or install podman (CONTAINER_ENGINE=podman to prefer it)."
} >&2
exit 1
