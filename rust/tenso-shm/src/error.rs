//! The one error type of the crate.

use std::fmt;
use std::io;

/// Everything that can go wrong with a segment or a pool.
///
/// I/O errors keep their [`io::ErrorKind`] (so the bindings can map `NotFound` to `FileNotFoundError`,
/// `AlreadyExists` to `FileExistsError`, ...), the rest carry the numbers that explain them.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShmError {
    /// A segment name that is empty, too long, or holds a character other than `[A-Za-z0-9._-]`.
    BadName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A system call failed.
    Io {
        /// What we were doing (`"shm_open"`, `"fallocate"`, ...).
        op: &'static str,
        /// The error, with its kind.
        source: io::Error,
    },
    /// A pool size below the minimum that fits the header, the index and one block.
    TooSmall {
        /// The size asked for.
        size: u64,
        /// The smallest size that works.
        minimum: u64,
    },
    /// The segment is not a TensoCache pool of a layout version we read.
    BadPool {
        /// What did not match.
        reason: &'static str,
    },
    /// A key longer than [`crate::pool::MAX_KEY_LEN`] bytes.
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The pool cannot hold `needed` more bytes even after evicting every evictable entry.
    Full {
        /// Bytes asked for (the 64-byte-aligned block size).
        needed: u64,
        /// Free bytes left (possibly fragmented) after eviction.
        free: u64,
        /// The size of the data region.
        capacity: u64,
    },
    /// A lease handle that does not name a live lease of this pool.
    BadLease,
    /// The lease is held by another process (it adopted it): only its holder may free it.
    LeaseHeldElsewhere,
    /// The pool's pin table, which also holds the references to leases, has no free slot.
    NoReferenceSlot,
}

impl ShmError {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        ShmError::Io {
            op,
            source: source.into(),
        }
    }

    /// The kind of the underlying I/O error, if this is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            ShmError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

impl fmt::Display for ShmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShmError::BadName { name, reason } => write!(f, "invalid shared memory name {name:?}: {reason}"),
            ShmError::Io { op, source } => write!(f, "{op} failed: {source}"),
            ShmError::TooSmall { size, minimum } => {
                write!(f, "pool size {size} is too small (minimum {minimum} bytes)")
            }
            ShmError::BadPool { reason } => write!(f, "not a tenso cache pool: {reason}"),
            ShmError::KeyTooLong { len, limit } => write!(f, "Key too long: {len} bytes (max {limit})"),
            ShmError::Full { needed, free, capacity } => write!(
                f,
                "cannot allocate {needed} bytes in the tenso cache pool ({free} of {capacity} bytes free after eviction)"
            ),
            ShmError::BadLease => write!(f, "no such lease in this pool"),
            ShmError::LeaseHeldElsewhere => write!(
                f,
                "this lease is held by another process (it was adopted); only its holder may release it"
            ),
            ShmError::NoReferenceSlot => write!(
                f,
                "the tenso cache pool's pin table is full: no room for another reference to a lease"
            ),
        }
    }
}

impl std::error::Error for ShmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ShmError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
