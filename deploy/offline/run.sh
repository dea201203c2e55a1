#!/usr/bin/env bash
# Starts deploy/compose.yaml for real with images built from Debian's packages (no container
# registry needed), sends traffic through the load balancer, SIGKILLs one replica mid-run,
# and checks the books: every answered request has its ledger row in PostgreSQL (but those
# of the killed replica's last unflushed batch), Redis holds the shared state, Prometheus
# scrapes the replicas. Needs a running Docker daemon with compose v2, root for debootstrap
# the first time. Usage: bash deploy/offline/run.sh [--keep]   (--keep: leave it running)
set -euo pipefail
cd "$(dirname "$0")/../.."
project=tierroute-offline
compose=(docker compose -p "$project" -f deploy/compose.yaml -f deploy/compose.offline.yaml)
requests=${REQUESTS:-600}

if ! docker image inspect tierroute-offline/debian:bookworm >/dev/null 2>&1; then
    root=$(mktemp -d)
    echo "== debootstrap bookworm (once; a few minutes)"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -c . | docker import - tierroute-offline/debian:bookworm >/dev/null
    rm -rf "$root"
fi
echo "== build the Python base, then the stack"
cp /etc/ssl/certs/ca-certificates.crt deploy/offline/ca-certificates.crt
docker build -q -f deploy/offline/Dockerfile --target python -t tierroute-offline/python . >/dev/null
# The shipped gateway.yaml, its remote tiers pointed at the stand-in upstream.
sed 's#https://api.openai.com/v1#http://upstream:9000/v1#' deploy/gateway.yaml > deploy/offline/gateway.yaml
"${compose[@]}" build -q
cleanup() { [ "${1:-}" = "--keep" ] || "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1; }
trap 'cleanup "${1:-}"' EXIT
"${compose[@]}" up -d --wait --wait-timeout 300

echo "== traffic"
python3 deploy/offline/traffic.py --url http://127.0.0.1:8000 --requests "$requests" \
    --kill "${compose[*]} kill -s SIGKILL gateway2" --out /tmp/tierroute-offline-traffic.json
answered=$(python3 -c "import json; print(json.load(open('/tmp/tierroute-offline-traffic.json'))['answered'])")
sleep 3  # the surviving writers flush within a second; give the queue time to drain

echo "== books"
rows=$("${compose[@]}" exec -T postgres psql -U tierroute -d tierroute -tAc "SELECT count(*) FROM requests")
keys=$("${compose[@]}" exec -T redis redis-cli dbsize)
targets=$(curl -s http://127.0.0.1:9090/api/v1/targets | python3 -c "
import json, sys
active = json.load(sys.stdin)['data']['activeTargets']
print(' '.join(f\"{t['labels']['instance']}={t['health']}\" for t in active))")
echo "answered (2xx): $answered; ledger rows in PostgreSQL: $rows; Redis keys: $keys"
echo "Prometheus targets: $targets"
lost=$((answered - rows))
echo "answered requests without a row: $lost (at most the killed replica's unflushed batch)"
[ "$rows" -gt 0 ] && [ "$keys" -gt 0 ] && [ "$lost" -le 64 ]
echo "== ok"
