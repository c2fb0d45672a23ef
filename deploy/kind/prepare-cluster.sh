#!/usr/bin/env bash
# Prepares a kind cluster (created from deploy/kind/cluster.yaml) for policy-agent. Run it once after
# `kind create cluster` and before installing the agent:
#
#   deploy/kind/prepare-cluster.sh [CLUSTER_NAME]      (default: policy-agent)
#
# It needs kind, kubectl and docker on PATH, and uses the kubeconfig context kind created (kind-CLUSTER_NAME).
# It is idempotent. Two things:
#
# 1. Turn off kindnet's built-in NetworkPolicy enforcement.
#    Since kind v0.24.0 (kubernetes-sigs/kind#3612, "Kindnet network policies", fixing kubernetes-sigs/kind#842),
#    kindnetd embeds the kube-network-policies controller (images/kindnetd/cmd/kindnetd/main.go: an nfqueue
#    controller with NFTableName "kindnet-network-policies", FailOpen). kind's kindnetd has no flag to turn it off
#    (the standalone aojea/kindnet has --network-policy=false, but it is a different CNI with its own plugin, DNS
#    cache and flowtable fast path), and networking.disableDefaultCNI would drop kindnet's ptp pod networking too.
#    With it running, the upstream deny tests pass even when policy-agent enforces nothing.
#    The switch used here is the one kube-network-policies' own e2e workflow uses on kind v0.29.0
#    (kubernetes-sigs/kube-network-policies .github/workflows/e2e.yml, step "Install kube-network-policies"):
#    run kindnet's DaemonSet with kindnetd v20230809-80a64d96, an image built from kind's main branch in 2023,
#    before policies were embedded (kind pins its kindnetd image in pkg/build/nodeimage/const_cni.go). Pod
#    networking (ptp veths, /32 routes, masquerade) is unchanged.
#    The replaced kindnetd exits on SIGTERM without running its cleanup, leaving its nftables table behind; it is
#    harmless (its pod-IP sets are empty while no NetworkPolicy exists), but it is removed so that nothing but
#    policy-agent touches policy traffic.
#
# 2. Give every node its own bpffs at /sys/fs/bpf.
#    kind nodes are containers: systemd inside them skips the bpffs mount it performs on real hosts (mount-setup.c
#    mounts /sys/fs/bpf without MNT_IN_CONTAINER), and a bpffs visible from the host would be shared by all nodes,
#    so the three agents would adopt each other's pins under /sys/fs/bpf/policy-agent. A node gets a fresh bpffs
#    instance unless it already has one of its own (a bpffs whose device number no other node, and not the host,
#    uses). The DaemonSet mounts /sys/fs/bpf with HostToContainer propagation and never mounts anything itself.
set -euo pipefail

cluster="${1:-policy-agent}"
context="kind-${cluster}"
kindnetd_without_policies="docker.io/kindest/kindnetd:v20230809-80a64d96"
kindnet_policy_table="kindnet-network-policies"

nodes="$(kind get nodes --name "${cluster}")"
if [ -z "${nodes}" ]; then
	echo "prepare-cluster: no nodes found for kind cluster ${cluster}" >&2
	exit 1
fi

echo "prepare-cluster: kindnet without NetworkPolicy enforcement (${kindnetd_without_policies})"
kubectl --context "${context}" -n kube-system set image daemonset/kindnet "kindnet-cni=${kindnetd_without_policies}"
kubectl --context "${context}" -n kube-system rollout status daemonset/kindnet --timeout=180s

# Device numbers of bpffs instances already taken: the host's own (if any), then each prepared node's.
taken=" "
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null || true)" = "bpf_fs" ]; then
	taken+="$(stat -c %d /sys/fs/bpf) "
fi

for node in ${nodes}; do
	if docker exec "${node}" nft list table inet "${kindnet_policy_table}" >/dev/null 2>&1; then
		echo "prepare-cluster: ${node}: removing kindnet's leftover nftables table inet ${kindnet_policy_table}"
		docker exec "${node}" nft delete table inet "${kindnet_policy_table}"
	fi

	fstype="$(docker exec "${node}" stat -f -c %T /sys/fs/bpf)"
	dev="$(docker exec "${node}" stat -c %d /sys/fs/bpf)"
	if [ "${fstype}" != "bpf_fs" ] || [[ "${taken}" == *" ${dev} "* ]]; then
		echo "prepare-cluster: ${node}: mounting a bpffs of its own at /sys/fs/bpf"
		docker exec "${node}" mount -t bpf -o mode=0700 bpf /sys/fs/bpf
		fstype="$(docker exec "${node}" stat -f -c %T /sys/fs/bpf)"
		dev="$(docker exec "${node}" stat -c %d /sys/fs/bpf)"
	fi
	if [ "${fstype}" != "bpf_fs" ] || [[ "${taken}" == *" ${dev} "* ]]; then
		echo "prepare-cluster: ${node}: /sys/fs/bpf is ${fstype} (device ${dev}), not a bpffs of its own" >&2
		exit 1
	fi
	taken+="${dev} "
	echo "prepare-cluster: ${node}: bpffs ready (device ${dev})"
done
