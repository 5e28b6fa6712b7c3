//! Loopback pod IPs: unique within the process, from `127.10.0.1` to `127.255.255.254`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

use rand::Rng;

/// Every IP leased by any stand-in kubelet of this process.
static LEASED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

const FIRST: u32 = u32::from_be_bytes([127, 10, 0, 1]);
const LAST: u32 = u32::from_be_bytes([127, 255, 255, 254]);

/// A random base `127.<10..=250>.<0..=255>.2`, so that kubelets of different test processes
/// started at the same time are unlikely to collide (within one process they never do).
pub(crate) fn random_base() -> Ipv4Addr {
    let mut rng = rand::thread_rng();
    Ipv4Addr::new(127, rng.gen_range(10..=250), rng.gen_range(0..=255), 2)
}

fn usable(ip: u32) -> bool {
    let last_octet = ip & 0xff;
    (FIRST..=LAST).contains(&ip) && last_octet != 0 && last_octet != 255
}

/// An IP held by one pod; released (back to the process-wide pool) when dropped.
#[derive(Debug)]
pub(crate) struct IpLease(u32);

impl IpLease {
    pub(crate) fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.0)
    }

    /// Reserves `ip` if it is usable and free (for adopting a pod already running).
    pub(crate) fn reserve(ip: Ipv4Addr) -> Option<IpLease> {
        let ip = u32::from(ip);
        if !usable(ip) {
            return None;
        }
        let inserted = LEASED.lock().unwrap_or_else(|e| e.into_inner()).insert(ip);
        // Build a lease only if reserved: dropping one frees its IP.
        if inserted { Some(IpLease(ip)) } else { None }
    }
}

impl Drop for IpLease {
    fn drop(&mut self) {
        LEASED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// One kubelet's allocator: hands out IPs upward from its base, wrapping around, skipping IPs
/// leased in this process and (if `probe_port` is set) IPs where that TCP port is taken.
/// An IP is never handed out twice while leased; freed IPs are reused only after a wrap.
#[derive(Debug)]
pub(crate) struct IpPool {
    next: u32,
    probe_port: Option<u16>,
}

impl IpPool {
    pub(crate) fn new(base: Ipv4Addr, probe_port: Option<u16>) -> Self {
        let base = u32::from(base);
        Self {
            next: if usable(base) { base } else { FIRST },
            probe_port,
        }
    }

    pub(crate) fn allocate(&mut self) -> Option<IpLease> {
        // Bounded: at most one pass over the range.
        for _ in 0..(LAST - FIRST + 1) {
            let candidate = self.next;
            self.next = if candidate >= LAST {
                FIRST
            } else {
                candidate + 1
            };
            if !usable(candidate) {
                continue;
            }
            let Some(lease) = IpLease::reserve(Ipv4Addr::from(candidate)) else {
                continue;
            };
            if let Some(port) = self.probe_port {
                let addr = SocketAddr::from((lease.ip(), port));
                if TcpListener::bind(addr).is_err() {
                    tracing::debug!(%addr, "pod IP skipped: port taken");
                    continue; // the lease drops, the IP returns to the pool
                }
            }
            return Some(lease);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_unique_ips_and_skips_unusable() {
        let mut pool = IpPool::new(Ipv4Addr::new(127, 200, 7, 253), None);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert_eq!(a.ip(), Ipv4Addr::new(127, 200, 7, 253));
        assert_eq!(b.ip(), Ipv4Addr::new(127, 200, 7, 254));
        assert_eq!(c.ip(), Ipv4Addr::new(127, 200, 8, 1));
        // A second pool with the same base never hands out a leased IP.
        let mut other = IpPool::new(Ipv4Addr::new(127, 200, 7, 253), None);
        assert_eq!(
            other.allocate().unwrap().ip(),
            Ipv4Addr::new(127, 200, 8, 2)
        );
        drop(a);
        assert!(IpLease::reserve(Ipv4Addr::new(127, 200, 7, 253)).is_some());
        assert!(IpLease::reserve(Ipv4Addr::new(127, 0, 0, 1)).is_none());
    }

    #[test]
    fn wraps_around_at_the_end() {
        let mut pool = IpPool::new(Ipv4Addr::new(127, 255, 255, 254), None);
        assert_eq!(
            pool.allocate().unwrap().ip(),
            Ipv4Addr::new(127, 255, 255, 254)
        );
        assert_eq!(pool.allocate().unwrap().ip(), Ipv4Addr::new(127, 10, 0, 1));
    }
}
