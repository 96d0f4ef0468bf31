//! A per-process cache of opened devices that refuses to serve a forked child.
//!
//! A `fork` copies the parent's memory, so a child sees the parent's cached contexts, streams and pinned buffers,
//! none of which are valid in it: the driver fails on them (or worse, on a context that happens to be valid,
//! corrupts). The cache remembers the process that filled it and answers [`GpuError::Forked`] anywhere else; the
//! parent's entries are never dropped in the child (dropping would call the driver on handles it does not own).

use std::collections::HashMap;
use std::hash::Hash;

use crate::GpuError;

/// Values made once per key for the life of the process that made them.
#[derive(Debug)]
pub struct ProcessCache<K, V> {
    owner: Option<u32>,
    entries: HashMap<K, V>,
}

impl<K, V> Default for ProcessCache<K, V> {
    fn default() -> Self {
        Self {
            owner: None,
            entries: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash, V: Clone> ProcessCache<K, V> {
    /// The value for `key`, made by `make` on first use; [`GpuError::Forked`] in a process other than the one that
    /// made the first entry.
    pub fn get_or_make(
        &mut self,
        key: K,
        make: impl FnOnce() -> Result<V, GpuError>,
    ) -> Result<V, GpuError> {
        self.get_or_make_in(std::process::id(), key, make)
    }

    fn get_or_make_in(
        &mut self,
        pid: u32,
        key: K,
        make: impl FnOnce() -> Result<V, GpuError>,
    ) -> Result<V, GpuError> {
        match self.owner {
            Some(parent) if parent != pid => return Err(GpuError::Forked { parent }),
            _ => {}
        }
        if let Some(v) = self.entries.get(&key) {
            return Ok(v.clone());
        }
        let v = make()?;
        self.owner = Some(pid);
        self.entries.insert(key, v.clone());
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_per_key_and_refused_in_another_process() {
        let mut cache = ProcessCache::<i32, u64>::default();
        let mut made = 0;
        let mut make = |v| {
            made += 1;
            Ok(v)
        };
        assert_eq!(cache.get_or_make_in(10, 0, || make(5)).unwrap(), 5);
        assert_eq!(cache.get_or_make_in(10, 0, || make(6)).unwrap(), 5);
        assert_eq!(made, 1);
        // The child of a fork: same memory, another pid. Neither a cached nor a new device is handed out.
        let err = cache.get_or_make_in(11, 0, || Ok(7)).unwrap_err();
        assert!(matches!(err, GpuError::Forked { parent: 10 }), "{err}");
        assert!(err.to_string().contains("spawn"));
        assert!(cache.get_or_make_in(11, 1, || Ok(7)).is_err());
        // A failed first open claims nothing: the process that retries owns the cache.
        let mut fresh = ProcessCache::<i32, u64>::default();
        assert!(fresh
            .get_or_make_in(20, 0, || Err(GpuError::NoDriver))
            .is_err());
        assert_eq!(fresh.get_or_make_in(21, 0, || Ok(1)).unwrap(), 1);
    }
}
