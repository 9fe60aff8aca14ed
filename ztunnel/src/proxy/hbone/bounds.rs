//! What one source can hold on port 15008, so that a flood from a few
//! sources cannot starve the rest:
//!
//! - [`HandshakeSlots`]: handshakes in progress, by source address. A
//!   source at its own cap loses its oldest handshake to its newest; when
//!   the whole table is full, the source holding the most loses its oldest.
//!   A real client has one handshake in progress for milliseconds, so it is
//!   never the one evicted while a flooding source holds more.
//! - [`PeerConnections`]: established connections, by the identity the
//!   peer proved. Past the cap a new connection is refused; other
//!   identities are not affected.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::oneshot;

use crate::identity::Identity;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Handshakes in progress, oldest first, each with a way to abandon it.
/// Shared with the waypoint, whose 15008 faces the same floods.
pub struct HandshakeSlots {
    max: usize,
    max_per_source: usize,
    inner: Mutex<InProgress>,
}

#[derive(Default)]
struct InProgress {
    next_id: u64,
    /// Oldest first.
    queue: VecDeque<Entry>,
    per_source: HashMap<IpAddr, usize>,
}

struct Entry {
    id: u64,
    source: IpAddr,
    evict: oneshot::Sender<()>,
}

impl InProgress {
    /// Abandons the oldest handshake of `source`.
    fn evict_oldest_of(&mut self, source: IpAddr) {
        if let Some(pos) = self.queue.iter().position(|e| e.source == source) {
            self.remove_at(pos, true);
        }
    }

    fn remove_at(&mut self, pos: usize, evict: bool) {
        let Some(entry) = self.queue.remove(pos) else {
            return;
        };
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        if evict {
            let _ = entry.evict.send(());
        }
    }

    /// The source with the most handshakes in progress; of several, the
    /// one with the oldest handshake (so that when every source holds as
    /// many, the oldest of all goes, not one a hash map happens to list
    /// last).
    fn heaviest(&self) -> Option<IpAddr> {
        let most = self.per_source.values().copied().max()?;
        self.queue
            .iter()
            .find(|e| self.per_source.get(&e.source) == Some(&most))
            .map(|e| e.source)
    }
}

/// One handshake's place; leaving it (drop) frees the place.
pub struct HandshakeSlot {
    id: u64,
    slots: Arc<HandshakeSlots>,
    /// Fires when a newer handshake pushed this one out.
    pub evicted: oneshot::Receiver<()>,
}

impl HandshakeSlots {
    /// At most `max` handshakes in progress, and `max_per_source` from one
    /// address.
    pub fn new(max: usize, max_per_source: usize) -> Self {
        HandshakeSlots {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            inner: Mutex::new(InProgress::default()),
        }
    }

    /// A place for a handshake from `source`, making room by evicting as
    /// the module's rules say.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> HandshakeSlot {
        let (tx, rx) = oneshot::channel();
        let mut inner = lock(&self.inner);
        if inner.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            inner.evict_oldest_of(source);
        }
        while inner.queue.len() >= self.max {
            match inner.heaviest() {
                Some(heaviest) => inner.evict_oldest_of(heaviest),
                None => break,
            }
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.queue.push_back(Entry {
            id,
            source,
            evict: tx,
        });
        *inner.per_source.entry(source).or_default() += 1;
        HandshakeSlot {
            id,
            slots: self.clone(),
            evicted: rx,
        }
    }

    /// Handshakes in progress now.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        lock(&self.inner).queue.len()
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut inner = lock(&self.slots.inner);
        if let Some(pos) = inner.queue.iter().position(|e| e.id == self.id) {
            inner.remove_at(pos, false);
        }
    }
}

/// Established connections by the identity the peer proved.
pub struct PeerConnections {
    max: usize,
    counts: Mutex<HashMap<Identity, usize>>,
}

/// One established connection's place; dropping it frees the place.
pub struct PeerSlot {
    peer: Identity,
    connections: Arc<PeerConnections>,
}

impl PeerConnections {
    /// At most `max` connections per identity.
    pub fn new(max: usize) -> Self {
        PeerConnections {
            max: max.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection from `peer`, or `None` when it holds
    /// its cap already.
    pub fn admit(self: &Arc<Self>, peer: &Identity) -> Option<PeerSlot> {
        let mut counts = lock(&self.counts);
        let n = counts.entry(peer.clone()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peer: peer.clone(),
            connections: self.clone(),
        })
    }

    /// Connections `peer` holds now.
    #[cfg(test)]
    pub fn held_by(&self, peer: &Identity) -> usize {
        lock(&self.counts).get(peer).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.connections.counts);
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_at_its_cap_loses_its_own_oldest_handshake() {
        let slots = Arc::new(HandshakeSlots::new(100, 3));
        let mut flood: Vec<_> = (0..3).map(|_| slots.admit(ip(1))).collect();
        let mut client = slots.admit(ip(2));
        let newest = slots.admit(ip(1));
        assert!(
            flood[0].evicted.try_recv().is_ok(),
            "the oldest of the flood stays"
        );
        assert!(flood[1].evicted.try_recv().is_err());
        assert!(
            client.evicted.try_recv().is_err(),
            "another source was evicted"
        );
        assert_eq!(slots.in_progress(), 4);
        drop(newest);
        assert_eq!(slots.in_progress(), 3);
    }

    #[test]
    fn a_full_table_evicts_from_the_heaviest_source_not_the_oldest_entry() {
        let slots = Arc::new(HandshakeSlots::new(4, 100));
        // A real client first: the oldest entry of all.
        let mut client = slots.admit(ip(2));
        let mut flood: Vec<_> = (0..3).map(|_| slots.admit(ip(1))).collect();
        let _newest = slots.admit(ip(1));
        assert!(
            client.evicted.try_recv().is_err(),
            "the real client was evicted"
        );
        assert!(flood[0].evicted.try_recv().is_ok());
        assert_eq!(slots.in_progress(), 4);
    }

    #[test]
    fn a_finished_handshake_frees_its_place_and_its_sources_count() {
        let slots = Arc::new(HandshakeSlots::new(2, 1));
        let first = slots.admit(ip(1));
        drop(first);
        let mut second = slots.admit(ip(1));
        assert!(
            second.evicted.try_recv().is_err(),
            "a freed place still counted"
        );
        assert_eq!(slots.in_progress(), 1);
    }

    #[test]
    fn a_peer_past_its_cap_is_refused_and_others_are_not() {
        let connections = Arc::new(PeerConnections::new(2));
        let flooder = Identity::new("cluster.local", "default", "flooder");
        let other = Identity::new("cluster.local", "default", "client");
        let a = connections.admit(&flooder).expect("first");
        let _b = connections.admit(&flooder).expect("second");
        assert!(connections.admit(&flooder).is_none());
        assert!(connections.admit(&other).is_some());
        drop(a);
        assert_eq!(connections.held_by(&flooder), 1);
        assert!(connections.admit(&flooder).is_some());
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 1, last])
    }

    fn evicted(slot: &mut HandshakeSlot) -> bool {
        slot.evicted.try_recv().is_ok()
    }

    #[test]
    fn up_to_the_cap_nobody_is_evicted_and_a_finished_one_frees_its_place() {
        let slots = Arc::new(HandshakeSlots::new(3, 3));
        let mut held = vec![slots.admit(ip(1)), slots.admit(ip(1)), slots.admit(ip(2))];
        assert_eq!(slots.in_progress(), 3);
        let done = held.remove(0);
        drop(done);
        assert_eq!(slots.in_progress(), 2);
        let mut newcomer = slots.admit(ip(3));
        assert!(
            held.iter_mut().all(|s| !evicted(s)),
            "room was made needlessly"
        );
        assert!(!evicted(&mut newcomer));
        assert_eq!(slots.in_progress(), 3);
    }

    #[test]
    fn when_no_source_holds_more_the_oldest_of_all_goes() {
        // Many sources with one handshake each (a flood from many
        // addresses): the oldest goes, as a real client's few milliseconds
        // never make it the oldest. Fresh tables, so that no lucky order
        // of a hash map can pass it.
        for _ in 0..20 {
            let slots = Arc::new(HandshakeSlots::new(3, 100));
            let mut held: Vec<_> = (1..=3).map(|i| slots.admit(ip(i))).collect();
            let _newest = slots.admit(ip(4));
            let gone: Vec<bool> = held.iter_mut().map(evicted).collect();
            assert_eq!(gone, [true, false, false]);
        }
    }

    #[test]
    fn an_evicted_handshake_leaving_frees_no_other_place() {
        let slots = Arc::new(HandshakeSlots::new(2, 1));
        let mut first = slots.admit(ip(1));
        let mut second = slots.admit(ip(1));
        assert!(evicted(&mut first));
        drop(first);
        assert_eq!(slots.in_progress(), 1, "the evicted one left twice");
        // The source still counts its one handshake in progress...
        let _third = slots.admit(ip(1));
        assert!(evicted(&mut second));
        // ...and another source has the free place without evicting.
        let mut other = slots.admit(ip(2));
        assert!(!evicted(&mut other));
        assert_eq!(slots.in_progress(), 2);
    }

    #[test]
    fn caps_of_zero_are_taken_as_one() {
        let slots = Arc::new(HandshakeSlots::new(0, 0));
        let mut first = slots.admit(ip(1));
        assert!(!evicted(&mut first), "a lone handshake is admitted");
        let _second = slots.admit(ip(2));
        assert!(evicted(&mut first));
        assert_eq!(slots.in_progress(), 1);
    }
}
