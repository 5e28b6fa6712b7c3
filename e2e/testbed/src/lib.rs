//! Test support for Keyward against the local control plane started by `e2e/cluster.sh up`.
//!
//! - [`client`]: a `kube::Client` for the plane (from `KUBECONFIG`, else
//!   `/tmp/keyward-cluster/admin.kubeconfig`).
//! - [`TestNamespace`]: a unique namespace per test, ready for pods, deleted afterwards.
//! - [`wait_for`] and [`conditions`]: watch-based waits with a timeout, never bare sleeps.
//! - [`Kubelet`]: a stand-in kubelet for one namespace (the plane has no kubelet and no
//!   scheduler), which runs a per-pod [`AgentFactory`] task on a unique loopback pod IP,
//!   projects Secret volumes into files and keeps them in sync; optionally honours grace
//!   periods ([`KubeletConfig::honour_grace_period`], pods then bound to Node [`NODE_NAME`],
//!   agents told through [`Termination`]); evicts, completes or loses pods on request
//!   ([`KubeletHandle::evict`], [`KubeletHandle::complete`], [`KubeletHandle::set_unknown`]);
//!   and records the token each pod started with ([`KubeletHandle::token_at_start`]).
//! - [`HttpAgent`]: the default agent, an HTTP server on `<pod IP>:8080`.
//! - [`OpaProcess`]: a real `opa run --server` per pod (built by `e2e/opa.sh`, see [`opa_binary`]).

mod agent;
mod binary;
mod env;
mod kubelet;
mod namespace;
mod opa;
pub mod tls;
mod wait;

pub use agent::{AgentFactory, HttpAgent, POD_NAME_HEADER, PodInfo, Termination};
pub use binary::private_binary_copy;
pub use env::{
    DEFAULT_KUBECONFIG, client, init_tracing, kube_config, kubeconfig_path, kubeconfig_with_token,
};
pub use kubelet::{
    Kubelet, KubeletConfig, KubeletError, KubeletHandle, NODE_NAME, ReadinessHook, RunningPod,
};
pub use namespace::TestNamespace;
pub use opa::{AgentProxy, OPA_PORT, OpaProcess, POD_NAME_HEADER_OPA, POD_UID_HEADER, opa_binary};
pub use wait::{BedBackoff, WaitError, conditions, eventually, wait_for, wait_for_deleted};

/// `keyward run` flags that lower every interval floor, so tests and the soak may use rotation
/// intervals of seconds (see `keyward run --help`).
pub const LOWERED_FLOORS: [&str; 10] = [
    "--min-rotation-interval",
    "0s",
    "--min-min-interval",
    "0s",
    "--min-overlap",
    "0s",
    "--min-token-ttl",
    "1s",
    "--min-publish-delay",
    "0s",
];
