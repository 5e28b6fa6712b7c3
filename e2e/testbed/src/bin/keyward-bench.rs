//! `keyward-bench`: the load benchmark's driver. Run it through `bash e2e/bench.sh`, which
//! starts a plane of its own with an audit log, installs the CRDs and the operator's RBAC,
//! builds the release operator and calls this once per N.

#[path = "../bench/mod.rs"]
mod bench;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match bench::main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
