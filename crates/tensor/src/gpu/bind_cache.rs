//! The bind groups of recent dispatches, kept for the next dispatch that binds the same ranges.
//!
//! A bind group ties a layout to buffer ranges; making one costs wgpu a validation pass and
//! several allocations, more than the rest of a dispatch together. Since the parameters travel
//! through a dynamic offset (see [`layout`](super::layout)), a bind group depends only on the
//! kernel's layout and its storage ranges `(binding, buffer, offset, size)`. The buffer pool
//! hands a training step the same buffers as the step before, so from the second step on
//! nearly every dispatch finds its bind group here.
//!
//! A cached bind group keeps its buffers alive, so the cache must neither outlive the pool's
//! buffers nor grow without bound:
//! - [`BindCache::clear`] drops everything; the context calls it whenever the pool lets
//!   buffers go (`trim_pool`, `destroy`), so no buffer outlives the pool because of the cache;
//! - entries live in two generations: a hit moves an entry into the current one, and when the
//!   current one reaches [`BindCache::new`]'s `capacity / 2` the previous generation is
//!   dropped. The cache never holds more than `capacity` entries, and what a step uses again
//!   survives (an approximation of least-recently-used at no cost per hit).
//!
//! The cache is generic over the buffer type (wgpu's `Buffer`, whose `Eq` and `Hash` are by
//! identity) and the cached value, so its logic is tested without a device.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// One storage range of a key: binding number, buffer, byte offset, byte size.
pub(crate) type Part<B> = (u32, B, u64, u64);

/// A cached value with the whole key it was made for (a hash may collide).
struct Entry<B, V> {
    layout: u32,
    parts: Vec<Part<B>>,
    value: V,
}

/// Values (bind groups) by (layout index, storage ranges).
pub(crate) struct BindCache<B, V> {
    current: HashMap<u64, Vec<Entry<B, V>>>,
    previous: HashMap<u64, Vec<Entry<B, V>>>,
    current_len: usize,
    capacity: usize,
    hasher: RandomState,
    hits: u64,
    misses: u64,
}

impl<B: Hash + Eq + Clone, V: Clone> BindCache<B, V> {
    /// An empty cache that holds at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            current_len: 0,
            capacity: capacity.max(2),
            hasher: RandomState::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The value for `layout` and `parts`, made by `make` if none is cached.
    pub fn get_or_insert<'a, E>(
        &mut self,
        layout: u32,
        parts: impl Iterator<Item = Part<&'a B>> + Clone,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E>
    where
        B: 'a,
    {
        let hash = self.hash(layout, parts.clone());
        if let Some(value) = find(&self.current, hash, layout, parts.clone()) {
            self.hits += 1;
            return Ok(value.clone());
        }
        let moved = self.previous.get_mut(&hash).and_then(|bucket| {
            let i = bucket
                .iter()
                .position(|e| matches(e, layout, parts.clone()))?;
            Some(bucket.swap_remove(i))
        });
        let entry = match moved {
            Some(entry) => {
                self.hits += 1;
                entry
            }
            None => {
                self.misses += 1;
                Entry {
                    layout,
                    parts: parts.map(|(b, buf, o, s)| (b, buf.clone(), o, s)).collect(),
                    value: make()?,
                }
            }
        };
        let value = entry.value.clone();
        if self.current_len >= self.capacity / 2 {
            self.previous = std::mem::take(&mut self.current);
            self.current_len = 0;
        }
        self.current.entry(hash).or_default().push(entry);
        self.current_len += 1;
        Ok(value)
    }

    /// Drop every entry (and with them the buffers they hold).
    pub fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
        self.current_len = 0;
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.current_len + self.previous.values().map(Vec::len).sum::<usize>()
    }

    /// Lookups answered from the cache and lookups that made a new value, since creation.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    fn hash<'a>(&self, layout: u32, parts: impl Iterator<Item = Part<&'a B>>) -> u64
    where
        B: 'a,
    {
        let mut h = self.hasher.build_hasher();
        layout.hash(&mut h);
        for part in parts {
            part.hash(&mut h);
        }
        h.finish()
    }
}

fn matches<'a, B: Eq + 'a, V>(
    e: &Entry<B, V>,
    layout: u32,
    mut parts: impl Iterator<Item = Part<&'a B>>,
) -> bool {
    e.layout == layout
        && e.parts.iter().all(|(b, buf, o, s)| {
            parts
                .next()
                .is_some_and(|(b2, buf2, o2, s2)| *b == b2 && buf == buf2 && *o == o2 && *s == s2)
        })
        && parts.next().is_none()
}

fn find<'m, 'a, B: Eq + 'a, V>(
    map: &'m HashMap<u64, Vec<Entry<B, V>>>,
    hash: u64,
    layout: u32,
    parts: impl Iterator<Item = Part<&'a B>> + Clone,
) -> Option<&'m V> {
    map.get(&hash)?
        .iter()
        .find(|e| matches(e, layout, parts.clone()))
        .map(|e| &e.value)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Look up `parts` (buffers are plain numbers here), making `made` on a miss.
    fn get(cache: &mut BindCache<u32, u32>, layout: u32, parts: &[Part<u32>], made: u32) -> u32 {
        let refs = parts.iter().map(|(b, buf, o, s)| (*b, buf, *o, *s));
        cache
            .get_or_insert(layout, refs, || Ok::<_, Infallible>(made))
            .unwrap()
    }

    #[test]
    fn the_same_layout_and_ranges_hit_and_any_difference_misses() {
        let mut cache = BindCache::new(16);
        let key = [(1, 7, 0, 64), (2, 8, 256, 64)];
        assert_eq!(get(&mut cache, 0, &key, 100), 100);
        assert_eq!(
            get(&mut cache, 0, &key, 101),
            100,
            "a hit returns the cached value"
        );
        assert_eq!(cache.hits_and_misses(), (1, 1));
        assert_eq!(get(&mut cache, 1, &key, 102), 102, "another layout");
        assert_eq!(
            get(&mut cache, 0, &[(1, 7, 0, 64), (2, 9, 256, 64)], 103),
            103
        );
        assert_eq!(
            get(&mut cache, 0, &[(1, 7, 0, 64), (2, 8, 512, 64)], 104),
            104
        );
        assert_eq!(
            get(&mut cache, 0, &[(1, 7, 0, 64), (2, 8, 256, 68)], 105),
            105
        );
        assert_eq!(
            get(&mut cache, 0, &[(1, 7, 0, 64), (3, 8, 256, 64)], 106),
            106
        );
        assert_eq!(get(&mut cache, 0, &[(1, 7, 0, 64)], 107), 107, "a prefix");
        assert_eq!(cache.len(), 7);
        assert_eq!(cache.hits_and_misses(), (1, 7));
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used_again() {
        let mut cache = BindCache::new(8);
        // A working set of 3 keys used over and over, among 100 keys used once each.
        for k in 0..3 {
            get(&mut cache, 0, &[(1, k, 0, 4)], k);
        }
        for round in 0..100u32 {
            for k in 0..3 {
                let v = get(&mut cache, 0, &[(1, k, 0, 4)], 999);
                assert_eq!(v, k, "key {k} survives round {round}");
            }
            get(&mut cache, 0, &[(1, 100 + round, 0, 4)], 0);
            assert!(cache.len() <= 8, "{} entries", cache.len());
        }
        assert_eq!(cache.hits_and_misses(), (300, 103));
    }

    #[test]
    fn clear_drops_every_entry() {
        let mut cache = BindCache::new(4);
        for k in 0..5 {
            get(&mut cache, 0, &[(1, k, 0, 4)], k);
        }
        assert!(cache.len() > 0);
        cache.clear();
        assert_eq!(cache.len(), 0);
        assert_eq!(get(&mut cache, 0, &[(1, 4, 0, 4)], 99), 99, "made anew");
    }
}
