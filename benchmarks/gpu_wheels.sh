#!/usr/bin/env bash
# The wheels lesion-ray needs on the GPU machine that neither its image nor ../shared/gpu/build-kit's .gpukit/
# holds: python-multipart (lesion_ray.serve.ingress imports it; without it serve and its tests cannot start).
#   bash benchmarks/gpu_wheels.sh          # from the checkout the device call sends: writes .gpuextra/ (git-ignored)
# Carry it beside the kit (run's carry: [".gpukit", ".gpuextra"]); gpu_suite.sh installs it into /tmp/site when
# python_multipart does not import there.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpuextra/' "$exclude" 2>/dev/null || echo '/.gpuextra/' >> "$exclude"
rm -rf "$root/.gpuextra" && mkdir -p "$root/.gpuextra"
pins=$(grep -iE '^python-multipart==' "$root/constraints.txt")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$root/.gpuextra" $pins 2>&1 | grep -v '^WARNING: Location' || true
echo "gpu_wheels: $(ls "$root/.gpuextra" | tr '\n' ' ')($(du -sk "$root/.gpuextra" | cut -f1) KiB) in $root/.gpuextra"
