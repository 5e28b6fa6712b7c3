//! Building blocks of the end-to-end scenarios in `e2e/rotation.rs`.

pub mod bundle_server;
pub mod control_plane;
pub mod opa_agent;
pub mod support;
