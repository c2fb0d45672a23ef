#!/usr/bin/env bash
# Proves that nothing in the cluster enforces NetworkPolicy before policy-agent is installed, so that the upstream
# suite run afterwards measures policy-agent and not kindnet's embedded controller (see prepare-cluster.sh).
#
#   deploy/kind/check-no-builtin-enforcement.sh [CLUSTER_NAME]      (default: policy-agent)
#
# It starts a server and a client pod, applies a deny-all ingress policy to the server, waits longer than the
# 10 s the upstream suite gives an enforcer, and requires the client to still connect. It removes its namespace.
set -euo pipefail

cluster="${1:-policy-agent}"
context="kind-${cluster}"
ns="policy-agent-precheck"
# agnhost, the image the Kubernetes e2e suite uses for its probes (tag from test/utils/image/manifest.go).
agnhost="registry.k8s.io/e2e-test-images/agnhost:2.52"

k() { kubectl --context "${context}" -n "${ns}" "$@"; }
cleanup() { kubectl --context "${context}" delete namespace "${ns}" --ignore-not-found --wait=false >/dev/null; }
trap cleanup EXIT

kubectl --context "${context}" create namespace "${ns}"
k run server --image="${agnhost}" --labels=app=server --port=8080 -- netexec --http-port=8080
k run client --image="${agnhost}" --labels=app=client -- pause
k wait --for=condition=Ready pod/server pod/client --timeout=180s
server_ip="$(k get pod server -o jsonpath='{.status.podIP}')"
# host:port, with brackets around an IPv6 address (IPv6-only clusters; on dual-stack ones podIP is the first family).
case "${server_ip}" in
*:*) server="[${server_ip}]:8080" ;;
*) server="${server_ip}:8080" ;;
esac

# Baseline: the client reaches the server with no policy at all.
k exec client -- /agnhost connect "${server}" --timeout=5s --protocol=tcp

k apply -f - <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all-ingress
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
EOF
sleep 15

if ! k exec client -- /agnhost connect "${server}" --timeout=5s --protocol=tcp; then
	echo "check-no-builtin-enforcement: a deny-all policy took effect before policy-agent was installed:" >&2
	echo "something else enforces NetworkPolicy (kindnet's embedded controller?); run prepare-cluster.sh" >&2
	exit 1
fi
echo "check-no-builtin-enforcement: no NetworkPolicy enforcement in the cluster before policy-agent"
