#!/usr/bin/env bash
# Set this machine up, then run one job. Safe to re-run: every step skips what is already done.
#
#   bash run.sh demo     set up, then serve the voice agent on the shipped demo models (http://127.0.0.1:8000)
#   bash run.sh test     set up, then run the whole test suite (what CI runs)
#   bash run.sh setup    set up only: system packages, .venv with torch and requirements.txt
#
# Needs Debian/Ubuntu with Python 3.10+, run as root (or with sudo) the first time for apt.
# On a GPU machine whose system Python already has torch (e.g. runpod/pytorch), that torch is kept:
# the venv sees it through --system-site-packages. Elsewhere the CPU wheel of torch is installed.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=$VENV/bin/python
TORCH_CPU_VERSION=2.13.0
APT_PACKAGES=(festival festival-te festvox-te-nsk espeak-ng sox ffmpeg libsndfile1 python3-venv chromium fonts-lohit-telu)

log() { printf '\033[1m[run.sh]\033[0m %s\n' "$*"; }

setup_system() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run.sh: need root to install: ${missing[*]} (run as root, or install them yourself)" >&2; exit 1; }
    sudo=sudo
  fi
  log "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_python() {
  if [ ! -x "$PY" ]; then
    if python3 -c 'import torch' >/dev/null 2>&1; then
      log "keeping the system's torch $(python3 -c 'import torch; print(torch.__version__)') (venv with system site-packages)"
      python3 -m venv --system-site-packages "$VENV"
    else
      python3 -m venv "$VENV"
    fi
  fi
  if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    # PyPI's default Linux torch wheel bundles CUDA (several GB); take the CPU build instead.
    if "$PY" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)' >/dev/null 2>&1; then
      log "installing torch $TORCH_CPU_VERSION (CPU) from download.pytorch.org"
      "$PY" -m pip install -q "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu
    else
      log "installing torch $TORCH_CPU_VERSION (CPU wheel from the configured index)"
      "$PY" -m pip install -q "torch==$TORCH_CPU_VERSION"
    fi
  fi
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing requirements.txt into $VENV"
    "$PY" -m pip install -q -r requirements.txt
    echo "$want" >"$stamp"
  fi
}

setup() {
  setup_system
  setup_python
}

cmd=${1:-}
case "$cmd" in
  setup)
    setup
    log "ready: activate with 'source $VENV/bin/activate'"
    ;;
  demo)
    setup
    shift
    # The agent on the default models shipped in checkpoints/demo (see its MODEL_CARD.md); the page's
    # sample questions are rendered on the first start. Extra args go to the server (--host 0.0.0.0 ...).
    log "starting the Telugu voice agent: open http://127.0.0.1:8000 in a browser (Ctrl-C stops it)"
    exec "$PY" streaming_server_advanced.py --model_dir checkpoints/demo "$@"
    ;;
  test)
    setup
    shift
    exec "$PY" -m pytest -q "$@" tests
    ;;
  *)
    echo "usage: bash run.sh {demo|test|setup} [extra args]" >&2
    exit 2
    ;;
esac
