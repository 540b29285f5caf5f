#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages from Debian, then a venv from PyPI
# pinned by constraints.txt (unpinned, pip walks back through many boto3 releases).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
# Alluxio (a cache backend of the local stack) runs on Java 17 from jars Maven fetches.
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's prometheus package starts a server; we only want promtool.
    (systemctl stop prometheus 2>/dev/null || service prometheus stop 2>/dev/null || pkill -x prometheus) >/dev/null 2>&1 || true
  else
    echo "setup: please install Debian packages: ${need_apt[*]} (not root, skipping)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[all]'
# The Alluxio servers' jars (devtools/maven/alluxio/pom.xml -> .xdc/maven/alluxio/lib, ~210 MB).
"$VENV/bin/python" -m devtools.alluxio fetch >/dev/null
touch "$VENV/.stamp"
echo "setup: done ($VENV)"
