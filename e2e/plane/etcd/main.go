// Command etcd is etcd's own server entry point (the same two lines as etcd's main.go), built
// from go.etcd.io/etcd/server/v3 at the version go.mod pins, for the local test plane.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
