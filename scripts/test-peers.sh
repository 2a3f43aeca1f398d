#!/usr/bin/env bash
# Installs and starts the real peers the tests talk to: DCMTK, Orthanc, RabbitMQ, PostgreSQL.
# Debian packages come from apt; servers already running are left alone. Needs root for apt.
set -euo pipefail

need_apt=()
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v rabbitmq-server >/dev/null || need_apt+=(rabbitmq-server)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
if ((${#need_apt[@]})); then
    echo "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps package scripts from starting system services (Orthanc would take 4242).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

# The tests run their own Orthanc instances on free ports; a packaged one would only compete.
if pgrep -f '^/usr/sbin/Orthanc /etc/orthanc' >/dev/null; then
    pkill -f '^/usr/sbin/Orthanc /etc/orthanc' || true
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
    for _ in $(seq 60); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
# A node whose app was stopped (stop_app) answers ping but does not serve AMQP.
if ! rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    rabbitmqctl start_app >/dev/null
fi
rabbitmq-diagnostics -q check_port_connectivity >/dev/null
pg_isready -h 127.0.0.1 -p 5432
