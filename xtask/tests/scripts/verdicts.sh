#!/bin/sh
# A user's script over the lab's command line: the verdicts a few policies imply, checked with
# probes. It names no address of its own: the one it needs comes from a probe's `to_ip`, so the
# same script runs unchanged in an IPv4, IPv6-only or dual-stack lab (LAB_IP_FAMILY).
#
#   XTASK=target/debug/xtask LAB_PREFIX=pal sh verdicts.sh
set -eu
: "${XTASK:?path of the xtask binary}" "${LAB_PREFIX:=pal}"
lab() { "$XTASK" lab --prefix "$LAB_PREFIX" "$@"; }
dir=$(mktemp -d)
trap 'lab down >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
fail=0
expect() {
    want=$1
    shift
    if lab probe --json "$@" | grep -q '"connected":true'; then got=allowed; else got=denied; fi
    if [ "$got" = "$want" ]; then
        echo "ok   $want: $*"
    else
        echo "FAIL $*: expected $want, got $got"
        fail=1
    fi
}

lab up --nodes 2
cat >"$dir/app.yaml" <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 8080, name: http}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: app, labels: {app: api}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 9090, name: api}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
spec: {containers: [{name: c, image: agnhost, ports: [{containerPort: 7070}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: app}
spec: {selector: {app: api}, ports: [{name: api, port: 80, targetPort: api}, {name: dns, port: 53, protocol: UDP}]}
EOF
lab apply -f "$dir/app.yaml"
expect allowed --from app/client --to app/api --port api
expect allowed --from app/web --to app/api --port api --via service
expect allowed --from ext --to app/web --port http

# The client's address, as the lab dials it.
client=$(lab probe --json --from app/web --to app/client --port 7070 | sed -n 's/.*"to_ip":"\([^"]*\)".*/\1/p')
case $client in *:*) mask=128 ;; *) mask=32 ;; esac
echo "client address: $client"

cat >"$dir/policy.yaml" <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-client, namespace: app}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{ipBlock: {cidr: "$client/$mask"}}]
    ports: [{port: api}]
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-egress, namespace: app}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 53, protocol: UDP}]}]
EOF
lab apply -f "$dir/policy.yaml"
expect allowed --from app/client --to app/api --port api
expect allowed --from app/client --to app/api --port api --via service
expect denied --from app/web --to app/api --port api
expect denied --from app/web --to app/api --port api --via service
expect allowed --from app/web --to app/api --port 53 --protocol UDP
expect allowed --from app/web --to app/api --port 53 --protocol UDP --via service
expect denied --from app/client --to app/api --port 53 --protocol UDP
expect denied --from app/web --to ext --port 80
expect allowed --from app/client --to ext --port 80
expect denied --from ext --to app/api --port api
expect allowed --from ext --to app/web --port http

lab delete -f "$dir/policy.yaml"
expect allowed --from app/web --to app/api --port api
expect allowed --from app/web --to ext --port 80
[ "$fail" = 0 ] && echo "every verdict as the policies imply"
exit "$fail"
