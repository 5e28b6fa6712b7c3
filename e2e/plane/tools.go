//go:build tools

// Package plane pins the programs of Keyward's local control plane. `go build` of the packages
// named here (see e2e/cluster.sh) makes kube-apiserver, kube-controller-manager and kubectl from
// k8s.io/kubernetes, etcdctl from go.etcd.io/etcd/etcdctl, and etcd from ./etcd.
package plane

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
