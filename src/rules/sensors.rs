//! The engine's sensor table: each topic seen gets a slot, and the rules' per-sensor states live
//! in vectors indexed by slot. Bounded by `max_sensors`: when full, the least recently used
//! sixteenth is evicted in one pass (amortised O(1) per new sensor) and counted; an evicted
//! slot's generation changes, so every rule's state for it starts afresh.
//!
//! Which rules' filters match a topic is computed once, when the topic gets its slot.

use std::collections::HashMap;

pub(crate) struct Slot {
    key: Box<str>,
    pub gen: u32,
    last_used: u64,
    /// Bit i: rule i's filter matches this topic.
    pub mask: Vec<u64>,
    pub live: bool,
}

pub(crate) struct Sensors {
    map: HashMap<Box<str>, u32, ahash::RandomState>,
    pub slots: Vec<Slot>,
    free: Vec<u32>,
    clock: u64,
    pub max: usize,
    pub evicted: u64,
    scratch: Vec<(u64, u32)>,
}

pub(crate) fn mask_bit(mask: &[u64], i: usize) -> bool {
    mask.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn compute_mask<F: AsRef<str>>(topic: &str, filters: &[F]) -> Vec<u64> {
    let mut mask = vec![0u64; filters.len().div_ceil(64).max(1)];
    for (i, f) in filters.iter().enumerate() {
        if crate::core::topic::matches(f.as_ref(), topic) {
            mask[i / 64] |= 1 << (i % 64);
        }
    }
    mask
}

impl Sensors {
    pub fn new(max: usize) -> Sensors {
        Sensors {
            map: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            clock: 0,
            max: max.max(1),
            evicted: 0,
            scratch: Vec::new(),
        }
    }

    pub fn live(&self) -> usize {
        self.map.len()
    }

    /// The slot of `topic`, creating it with `mask` from `filters` (evicting if full).
    pub fn slot<F: AsRef<str>>(&mut self, topic: &str, filters: &[F]) -> u32 {
        self.clock += 1;
        if let Some(&id) = self.map.get(topic) {
            self.slots[id as usize].last_used = self.clock;
            return id;
        }
        if self.map.len() >= self.max {
            self.evict();
        }
        let mask = compute_mask(topic, filters);
        let key: Box<str> = topic.into();
        let id = match self.free.pop() {
            Some(id) => {
                let s = &mut self.slots[id as usize];
                s.key = key.clone();
                s.gen = s.gen.wrapping_add(1);
                s.last_used = self.clock;
                s.mask = mask;
                s.live = true;
                id
            }
            None => {
                self.slots.push(Slot {
                    key: key.clone(),
                    gen: 1,
                    last_used: self.clock,
                    mask,
                    live: true,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.map.insert(key, id);
        id
    }

    fn evict(&mut self) {
        self.scratch.clear();
        self.scratch.extend(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.live)
                .map(|(i, s)| (s.last_used, i as u32)),
        );
        let n = (self.scratch.len() / 16).max(1).min(self.scratch.len());
        if n == 0 {
            return;
        }
        self.scratch.select_nth_unstable(n - 1);
        for k in 0..n {
            let id = self.scratch[k].1;
            let s = &mut self.slots[id as usize];
            s.live = false;
            s.gen = s.gen.wrapping_add(1);
            self.map.remove(&s.key);
            s.key = "".into();
            s.mask.clear();
            self.free.push(id);
        }
        self.evicted += n as u64;
    }

    /// Rules changed: recompute every live slot's mask.
    pub fn remask<F: AsRef<str>>(&mut self, filters: &[F]) {
        for s in self.slots.iter_mut().filter(|s| s.live) {
            s.mask = compute_mask(&s.key, filters);
        }
    }

    pub fn topic(&self, id: u32) -> &str {
        &self.slots[id as usize].key
    }
}

/// Per-sensor state of one action, indexed by slot; a generation mismatch means the slot was
/// reused for another sensor and the state starts afresh.
#[derive(Debug, Default)]
pub(crate) struct States<S> {
    pub v: Vec<(u32, S)>,
}

impl<S: Default> States<S> {
    pub fn get(&mut self, id: u32, gen: u32) -> &mut S {
        let i = id as usize;
        if i >= self.v.len() {
            self.v.resize_with(i + 1, || (0, S::default()));
        }
        let e = &mut self.v[i];
        if e.0 != gen {
            *e = (gen, S::default());
        }
        &mut e.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_eviction() {
        let mut s = Sensors::new(32);
        for i in 0..32 {
            s.slot(&format!("t/{i}"), &["t/#"]);
        }
        // Touch t/0 so it is recent; t/1 and t/2 are the oldest.
        s.slot("t/0", &["t/#"]);
        assert_eq!(s.live(), 32);
        s.slot("t/new", &["t/#"]);
        assert_eq!(s.evicted, 2);
        assert_eq!(s.live(), 31);
        assert!(s.map.contains_key("t/0"));
        assert!(!s.map.contains_key("t/1"));
        assert!(!s.map.contains_key("t/2"));
        let id = s.slot("t/new", &["x"]);
        assert!(mask_bit(&s.slots[id as usize].mask, 0));
        let mut st: States<u32> = States::default();
        *st.get(id, s.slots[id as usize].gen) = 5;
        assert_eq!(*st.get(id, s.slots[id as usize].gen), 5);
        assert_eq!(*st.get(id, s.slots[id as usize].gen + 1), 0);
    }
}
