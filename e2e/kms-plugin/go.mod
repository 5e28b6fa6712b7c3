// A minimal KMS v2 plugin for e2e/encryption.sh (the local plane's encryption at rest through
// KMS v2). k8s.io/kms at the release of the plane's k8s.io/kubernetes (e2e/plane/go.mod).
module keyward.dev/e2e/kms-plugin

go 1.26.0

require k8s.io/kms v0.37.2

require (
	golang.org/x/net v0.57.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
	golang.org/x/text v0.40.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20260526163538-3dc84a4a5aaa // indirect
	google.golang.org/grpc v1.82.1 // indirect
	google.golang.org/protobuf v1.36.12-0.20260120151049-f2248ac996af // indirect
)
