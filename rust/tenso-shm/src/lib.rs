//! Shared memory for tenso-ray: POSIX segments ([`segment`]), the robust lock word ([`lock`]), the free-space table
//! ([`alloc`]), the TensoCache pool ([`pool`]) and private copy-on-write views of shared file mappings ([`private`]).
//!
//! This is the crate that owns `mmap` and the atomics over shared memory; it has no Python in it. The bindings in
//! `tenso-py` wrap [`segment::Segment`] as `tenso.TensoShm` and [`pool::Pool`] as `tenso.TensoCache`.
#![deny(missing_docs)]

pub mod alloc;
pub mod error;
pub mod lock;
pub mod pool;
pub mod private;
pub mod segment;

pub use error::ShmError;
pub use pool::{
    Batched, Hit, Lease, LeaseHandle, Packet, Park, Pin, Pinned, Pool, PoolStats, Probe,
    Reservation, Room, Spin,
};
pub use segment::{unlink, validate_name, Segment};
