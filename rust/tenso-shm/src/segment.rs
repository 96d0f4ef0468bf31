//! POSIX shared-memory segments: `shm_open` + `mmap`, reserved at creation.
//!
//! Unlike Python's `multiprocessing.shared_memory`, nothing here registers the segment with a resource tracker:
//! a segment lives until someone calls [`unlink`], however many attached processes exit. Creation reserves the
//! whole size with `fallocate`, so a full `/dev/shm` fails at creation with `ENOSPC` instead of raising `SIGBUS`
//! at some later write into a hole.
//!
//! # Who may write
//! A mapping is shared with every process that opens the same name. This module hands out raw pointers only;
//! the protocol that decides who writes which bytes when is the caller's ([`crate::pool`] for caches, the single
//! writer of a [`Segment`] holding one packet otherwise). Bytes read through a mapping can change at any time if
//! another process writes them.

use std::io;
use std::os::fd::OwnedFd;

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{FallocateFlags, Mode};
use rustix::shm;

use crate::error::ShmError;

/// Longest accepted name, below the kernel's NAME_MAX (255) with room for a prefix.
pub const MAX_NAME_LEN: usize = 200;

/// Default permission bits of a new segment: owner read/write only.
pub const DEFAULT_MODE: u32 = 0o600;

/// Checks a segment name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9._-]`, not `.` or `..`, with at most one
/// leading `/` (the POSIX spelling, stripped). Returns the name without the slash.
pub fn validate_name(name: &str) -> Result<&str, ShmError> {
    let bad = |reason| ShmError::BadName {
        name: name.to_owned(),
        reason,
    };
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() {
        return Err(bad("empty"));
    }
    if bare.len() > MAX_NAME_LEN {
        return Err(bad("longer than 200 bytes"));
    }
    if bare == "." || bare == ".." {
        return Err(bad("'.' and '..' are not names"));
    }
    if !bare
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(bad(
            "only ASCII letters, digits, '_', '-' and '.' are allowed",
        ));
    }
    Ok(bare)
}

/// A mapped POSIX shared-memory segment.
///
/// Dropping it unmaps the memory (after every borrow of it has ended, which the owner types of the bindings
/// ensure); it never unlinks the name.
#[derive(Debug)]
pub struct Segment {
    name: String,
    map: MmapRaw,
}

impl Segment {
    /// Creates a new segment of `size` bytes (`O_EXCL`: an existing name fails with `AlreadyExists`), with
    /// permission bits `mode` (before the umask), all of it reserved and zeroed, and maps it.
    ///
    /// With `populate`, the mapping is pre-faulted (`MAP_POPULATE`) so that first writes do not fault.
    pub fn create(name: &str, size: u64, mode: u32, populate: bool) -> Result<Segment, ShmError> {
        let bare = validate_name(name)?;
        if size == 0 {
            return Err(ShmError::io(
                "create",
                io::Error::new(io::ErrorKind::InvalidInput, "size must be > 0"),
            ));
        }
        let len = usize::try_from(size).map_err(|_| {
            ShmError::io(
                "create",
                io::Error::new(io::ErrorKind::InvalidInput, "size too large"),
            )
        })?;
        let fd = shm::open(
            bare,
            shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR,
            Mode::from_raw_mode(mode & 0o777),
        )
        .map_err(|e| ShmError::io("shm_open", e))?;
        let reserve = || -> Result<(), ShmError> {
            match rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size) {
                Ok(()) => Ok(()),
                // Some file systems lack fallocate; fall back to a plain size (no reservation possible there).
                Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {
                    rustix::fs::ftruncate(&fd, size).map_err(|e| ShmError::io("ftruncate", e))
                }
                Err(e) => Err(ShmError::io("fallocate", e)),
            }
        };
        let mapped = reserve().and_then(|()| map(&fd, len, populate));
        match mapped {
            Ok(map) => Ok(Segment {
                name: bare.to_owned(),
                map,
            }),
            Err(e) => {
                // Do not leave a half-made segment behind under a name nobody will unlink.
                let _ = shm::unlink(bare);
                Err(e)
            }
        }
    }

    /// Opens and maps an existing segment, its whole current size.
    pub fn open(name: &str, populate: bool) -> Result<Segment, ShmError> {
        let bare = validate_name(name)?;
        let fd = shm::open(bare, shm::OFlags::RDWR, Mode::empty())
            .map_err(|e| ShmError::io("shm_open", e))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| ShmError::io("fstat", e))?;
        let len = usize::try_from(stat.st_size).unwrap_or(0);
        if len == 0 {
            return Err(ShmError::io(
                "open",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the shared memory segment is empty",
                ),
            ));
        }
        let map = map(&fd, len, populate)?;
        Ok(Segment {
            name: bare.to_owned(),
            map,
        })
    }

    /// A private anonymous mapping of `size` bytes standing in for a named segment, so that the pool's logic can be
    /// tested within one process, including under Miri, which cannot open shared memory. It has no name.
    #[cfg(test)]
    pub(crate) fn anonymous(size: usize) -> Segment {
        let map = MmapOptions::new()
            .len(size)
            .map_anon()
            .expect("anonymous mapping");
        Segment {
            name: String::new(),
            map: MmapRaw::from(map),
        }
    }

    /// The name, without a leading slash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mapped length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a segment has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The first byte of the mapping. Valid for [`Self::len`] bytes for as long as `self` lives; other processes
    /// may write it concurrently (see the module docs).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Unlinks the name of this segment (the mapping stays valid).
    pub fn unlink(&self) -> Result<(), ShmError> {
        unlink(&self.name)
    }
}

fn map(fd: &OwnedFd, len: usize, populate: bool) -> Result<MmapRaw, ShmError> {
    let mut opts = MmapOptions::new();
    opts.len(len);
    if populate {
        opts.populate();
    }
    opts.map_raw(fd).map_err(|e| ShmError::io("mmap", e))
}

/// Removes a segment name. Processes that have it mapped keep their mapping.
pub fn unlink(name: &str) -> Result<(), ShmError> {
    let bare = validate_name(name)?;
    shm::unlink(bare).map_err(|e| ShmError::io("shm_unlink", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(tag: &str) -> String {
        format!(
            "tenso-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(['(', ')'], "")
    }

    #[test]
    fn names() {
        assert_eq!(validate_name("/abc").unwrap(), "abc");
        assert!(validate_name("").is_err());
        assert!(validate_name("/").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(201)).is_err());
    }

    #[test]
    #[cfg_attr(miri, ignore = "needs POSIX shared memory")]
    fn create_open_unlink() {
        let name = unique("seg");
        let seg = Segment::create(&name, 8192, DEFAULT_MODE, true).unwrap();
        assert_eq!(seg.len(), 8192);
        // SAFETY: the mapping is 8192 bytes, this test is its only writer.
        unsafe { seg.as_ptr().add(100).write(42) };
        let other = Segment::open(&name, false).unwrap();
        // SAFETY: the same 8192-byte segment mapped again; the write above happened-before in this thread.
        assert_eq!(unsafe { other.as_ptr().add(100).read() }, 42);
        let err = Segment::create(&name, 8192, DEFAULT_MODE, false).unwrap_err();
        assert_eq!(err.io_kind(), Some(io::ErrorKind::AlreadyExists));
        let meta = std::fs::metadata(format!("/dev/shm/{name}")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "no group/other access by default"
        );
        seg.unlink().unwrap();
        assert_eq!(
            Segment::open(&name, false).unwrap_err().io_kind(),
            Some(io::ErrorKind::NotFound)
        );
    }
}
