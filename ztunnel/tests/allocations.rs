//! Heap allocations on the per-connection path, counted by a counting
//! global allocator. Counts, not timings: each check holds for any machine
//! and load. The whole path's count is measured in the lab (README,
//! "Per-connection allocations"); these pin the pieces that once dominated it.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    path::Path,
};

use ztunnel::{config::local::LocalConfig, identity::Identity, state::Snapshot};

/// Counts allocations made by the current thread while `counting` is set,
/// so that the test harness's other threads do not disturb a count.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only
// counts, in thread-locals that need no allocation themselves.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        tally();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        tally();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn tally() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread (its result is dropped uncounted).
fn allocations<T>(f: impl FnOnce() -> T) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    drop(out);
    COUNT.with(|c| c.get())
}

const CONFIG: &str = r#"
workloads:
- uid: u/client
  name: client
  namespace: shop
  serviceAccount: cart
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  node: n1
  clusterId: Kubernetes
  canonicalName: cart
  canonicalRevision: v1
  services: {}
"#;

fn snapshot() -> Snapshot {
    let config =
        LocalConfig::parse(CONFIG, Path::new("allocations.yaml")).unwrap_or_else(|e| panic!("{e}"));
    Snapshot::new("n1", "cluster.local", &config)
}

fn client(snapshot: &Snapshot) -> std::sync::Arc<ztunnel::state::Workload> {
    snapshot
        .workload_by_ip("10.0.0.1".parse().expect("an address"))
        .expect("the client workload")
        .clone()
}

#[test]
fn cloning_an_identity_shares_its_strings() {
    let id = Identity::new("cluster.local", "shop", "cart");
    assert_eq!(allocations(|| id.clone()), 0);
}

#[test]
fn a_configured_workloads_identity_is_built_once_per_snapshot() {
    let snapshot = snapshot();
    let client = client(&snapshot);
    let id = snapshot.identity_of(&client);
    assert_eq!(id, Identity::new("cluster.local", "shop", "cart"));
    assert_eq!(allocations(|| snapshot.identity_of(&client)), 0);
}

#[test]
fn the_baggage_header_is_one_buffer() {
    let snapshot = snapshot();
    let client = client(&snapshot);
    let header = ztunnel::proxy::hbone::baggage(&client);
    assert!(header.contains("service.name=cart"), "{header}");
    // The workload-type key and the header itself; it used to take a
    // string per member, a vector and a join (12).
    assert!(
        allocations(|| ztunnel::proxy::hbone::baggage(&client)) <= 2,
        "baggage allocates more than its key and its buffer"
    );
}
