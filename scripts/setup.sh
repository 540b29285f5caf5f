#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages from Debian, Apache Kafka's jars from Maven
# Central, then a venv from PyPI pinned by constraints.txt (unpinned, pip walks back through many
# boto3 releases). It never stops or kills a service it did not start.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)  # the PostgreSQL state backend
# Apache Kafka 4 (the local stack's broker) and Alluxio (a cache backend) need Java 17+; Maven fetches their jars.
java_ok() { command -v java >/dev/null && java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); exit !(v[1] >= 17)}'; }
java_ok || need_apt+=(default-jdk-headless)
command -v mvn >/dev/null || need_apt+=(maven)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq >/dev/null
    # Debian's prometheus and postgresql packages would start servers: we only want their binaries
    # (the stack and the tests start their own on free ports). A policy-rc.d that
    # refuses every start keeps any package from starting one, for this install only (an existing
    # policy is put back afterwards).
    policy=/usr/sbin/policy-rc.d saved=""
    if [ -e "$policy" ]; then saved=$(mktemp); cp -p "$policy" "$saved"; fi
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
    restore_policy() { if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi; }
    trap restore_policy EXIT
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    restore_policy; trap - EXIT
  else
    echo "setup: please install Debian packages: ${need_apt[*]} (not root, skipping)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[all]'
# Apache Kafka's jars (devtools/maven/kafka/pom.xml) into .xdc/maven/kafka, once: the same code the
# stack runs lazily when they are missing.
"$VENV/bin/python" -c 'from devtools.kafka_broker import ensure_jars; print("setup: Apache Kafka jars in", ensure_jars())'
# The Alluxio servers' jars (devtools/maven/alluxio/pom.xml -> .xdc/maven/alluxio/lib, ~210 MB).
"$VENV/bin/python" -m devtools.alluxio fetch >/dev/null
touch "$VENV/.stamp"
echo "setup: done ($VENV)"
