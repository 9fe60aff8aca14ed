//! What the pinned maps must look like for this ztunnel's programs.
//!
//! A restart re-adopts the maps an earlier ztunnel pinned. If that ztunnel
//! was a version whose maps had another layout (a counter added, say), this
//! one's programs cannot use them: the loader would hand them over as they
//! are and the verifier would refuse the programs, or worse, accept them.
//! Such maps are set aside (`maps-retired`) and fresh ones made; userspace
//! holds everything they carry except counters, and the fresh maps are
//! filled before any program reads them. The retired ones stay pinned,
//! still serving the earlier programs, until every link runs ours.

use std::{
    io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use ztunnel_common::{
    maps, DirectFlow, ExclusionKey, FlowKey, PodCounters, PodInfo, PodKey, PolicyTuple,
    PolicyVerdict, DIRECT_EVENTS_BYTES, MAX_CAPTURED_FLOWS, MAX_DIRECT_FLOWS, MAX_EXCLUSIONS,
    MAX_PODS, MAX_POLICY_ENTRIES,
};

use super::RedirectError;

/// One map's shape: name, type, key and value size, capacity.
struct Shape {
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    max_entries: u32,
}

fn shapes() -> [Shape; 10] {
    let [policy_a, policy_b] = maps::POLICY_TABLES;
    // An LPM trie key is the prefix length (u32) and the data.
    let lpm_key = size_of::<u32>() + size_of::<PolicyTuple>();
    [
        Shape {
            name: maps::ENROLLED_PODS,
            kind: MapType::Hash,
            key: size_of::<PodKey>(),
            value: size_of::<PodInfo>(),
            max_entries: MAX_PODS,
        },
        Shape {
            name: maps::POD_COUNTERS,
            kind: MapType::PerCpuHash,
            key: size_of::<PodKey>(),
            value: size_of::<PodCounters>(),
            max_entries: MAX_PODS,
        },
        Shape {
            name: policy_a,
            kind: MapType::LpmTrie,
            key: lpm_key,
            value: size_of::<PolicyVerdict>(),
            max_entries: MAX_POLICY_ENTRIES,
        },
        Shape {
            name: policy_b,
            kind: MapType::LpmTrie,
            key: lpm_key,
            value: size_of::<PolicyVerdict>(),
            max_entries: MAX_POLICY_ENTRIES,
        },
        Shape {
            name: maps::POLICY_ACTIVE,
            kind: MapType::Array,
            key: size_of::<u32>(),
            value: size_of::<u32>(),
            max_entries: 1,
        },
        Shape {
            name: maps::LISTENERS,
            kind: MapType::SockMap,
            key: size_of::<u32>(),
            value: size_of::<u32>(),
            max_entries: 3,
        },
        Shape {
            name: maps::CAPTURED_FLOWS,
            kind: MapType::LruHash,
            key: size_of::<FlowKey>(),
            value: size_of::<u8>(),
            max_entries: MAX_CAPTURED_FLOWS,
        },
        Shape {
            name: maps::OUTBOUND_EXCLUSIONS,
            kind: MapType::LpmTrie,
            key: size_of::<u32>() + size_of::<ExclusionKey>(),
            value: size_of::<u8>(),
            max_entries: MAX_EXCLUSIONS,
        },
        Shape {
            name: maps::DIRECT_FLOWS,
            kind: MapType::LruHash,
            key: size_of::<FlowKey>(),
            value: size_of::<DirectFlow>(),
            max_entries: MAX_DIRECT_FLOWS,
        },
        Shape {
            name: maps::DIRECT_EVENTS,
            kind: MapType::RingBuf,
            key: 0,
            value: 0,
            max_entries: DIRECT_EVENTS_BYTES,
        },
    ]
}

/// Why the pinned map at `path` cannot serve this ztunnel, if it cannot.
fn incompatibility(path: &Path, shape: &Shape) -> Result<Option<String>, RedirectError> {
    let info = MapInfo::from_pin(path).map_err(|source| RedirectError::Map {
        map: shape.name,
        source,
    })?;
    let kind = info.map_type().ok();
    let found = (
        kind,
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    let wanted = (Some(shape.kind), shape.key, shape.value, shape.max_entries);
    Ok((found != wanted).then(|| {
        format!(
            "{}: {:?}, key {} B, value {} B, {} entries (this ztunnel needs {:?}, key {} B, value {} B, {} entries)",
            shape.name, found.0, found.1, found.2, found.3, shape.kind, shape.key, shape.value, shape.max_entries
        )
    }))
}

/// Sets the maps in `maps_dir` aside if any of them has a layout this
/// ztunnel's programs cannot use; returns where they went.
pub fn retire_incompatible(maps_dir: &Path) -> Result<Option<PathBuf>, RedirectError> {
    let mut reasons = Vec::new();
    for shape in shapes() {
        let path = maps_dir.join(shape.name);
        if path.exists() {
            reasons.extend(incompatibility(&path, &shape)?);
        }
    }
    if reasons.is_empty() {
        return Ok(None);
    }
    // bpffs refuses names with dots.
    let retired = maps_dir.with_file_name("maps-retired");
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| RedirectError::PinDir { path, source }
    };
    // A retired set from an even earlier upgrade that never finished.
    if retired.exists() {
        std::fs::remove_dir_all(&retired).map_err(io_err(&retired))?;
    }
    std::fs::rename(maps_dir, &retired).map_err(io_err(maps_dir))?;
    std::fs::create_dir_all(maps_dir).map_err(io_err(maps_dir))?;
    tracing::warn!(
        retired = %retired.display(),
        reasons = %reasons.join("; "),
        "pinned maps from an incompatible ztunnel set aside; fresh maps are filled before use, and kernel counters restart from zero"
    );
    Ok(Some(retired))
}
