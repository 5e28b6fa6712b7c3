//! Keyward: a Kubernetes operator that mints, publishes, hands out, rotates and revokes
//! Ed25519 provisioning keys for policy agents, and revokes an old key only on evidence that
//! every agent connects with its successor.
//!
//! The code follows one pipeline per resource: observe (reads) -> decide (pure) -> apply
//! (idempotent writes) -> report (status, Events, logs).

pub mod admission;
pub mod agent;
pub mod agent_proxy;
pub mod api;
#[cfg(test)]
mod architecture;
pub mod bundle_copy;
pub mod cli;
pub mod client;
pub mod controller;
pub mod fault;
pub mod fuzzing;
pub mod heap;
pub mod http;
pub mod hygiene;
pub mod keys;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod reason;
pub mod rotation;
pub mod telemetry;
pub mod time;
pub mod trust_record;
pub mod usage;
pub mod verifier;
pub mod workload;
