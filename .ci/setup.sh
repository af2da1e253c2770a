#!/usr/bin/env bash
# Prepare everything the tests need; safe to re-run (each step is skipped when done).
#   1. apt: FFCV build deps (pkg-config, OpenCV, libjpeg-turbo, a C++ compiler)
#      + slurm-wlm/munge for the local test clusters, iproute2 for the two-node one's network namespaces
#   2. .venv (python3 -m venv)
#   3. the project + pinned deps installed editable into it (pip install -e .)
# No root / not Debian? See docs/install.md (SETUP_SKIP_APT=1 skips step 1).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev g++ slurm-wlm munge iproute2)
VENV=.venv
STAMP="$VENV/.setup-stamp"   # sha256 of pyproject.toml + constraints at the last successful install

# 1. system packages
if [[ "${SETUP_SKIP_APT:-0}" == 1 ]]; then
  echo "setup: skipping apt packages (SETUP_SKIP_APT=1)"
else
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == *" ok installed" ]] || missing+=("$pkg")
  done
  if (( ${#missing[@]} == 0 )); then
    echo "setup: apt packages present"
  elif [[ "$(id -u)" != 0 ]]; then
    echo "setup: missing apt packages (${missing[*]}) and not root: see docs/install.md for installing without root" >&2
    exit 1
  else
    echo "setup: installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
  fi
fi

# 2. virtualenv
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV"
  python3 -m venv "$VENV"
fi

# 3. project + pinned dependencies (only when pyproject.toml changed or imports fail)
want="$(cat pyproject.toml .ci/constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && "$VENV/bin/python" -c "import trainer, ffcv, torch" 2>/dev/null; then
  echo "setup: venv up to date"
else
  echo "setup: installing project into $VENV (pip install -e .; first time takes minutes)"
  "$VENV/bin/python" -m pip install -e . -c .ci/constraints.txt
  echo "$want" > "$STAMP"
  echo "setup: venv ready"
fi
