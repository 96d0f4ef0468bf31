//! Private (copy-on-write) views of bytes that this process maps shared from a file.
//!
//! Shared bytes are immutable once published (Ray's object store, a node-pool entry, a lease): a reader that may
//! write gets a `MAP_PRIVATE` mapping of the same file pages instead of a copy. Reads hit the shared page cache; the
//! first write to a page copies that page alone into the writer's memory, so a write reaches nobody else.
//!
//! To map the pages privately we need the *file* behind an address. The kernel says which mapping covers an address
//! (`PROCMAP_QUERY` on `/proc/self/maps`, Linux 6.11+, or the text of `/proc/self/maps` on older kernels): its
//! start, end, file offset, device and inode, and whether it is shared. The file is then reopened read-only by one
//! of three routes, tried in order and resolved once per file (cached by device and inode):
//!
//! | route       | how                                                    | works when                              |
//! |-------------|--------------------------------------------------------|-----------------------------------------|
//! | `map_files` | `open("/proc/self/map_files/<start>-<end>")`           | root, or CAP_CHECKPOINT_RESTORE         |
//! | `path`      | the path `/proc/self/maps` names, if not `(deleted)`   | the file still has that name            |
//! | `proc_fd`   | `/proc/<pid>/fd/<n>` of a hinted process (the store)   | same user, the process keeps it open    |
//!
//! Each candidate is checked with `fstat` against the mapping's device and inode before it is used. A private
//! mapping over an `O_RDONLY` descriptor may be written (the writes never reach the file), so nothing we hold can
//! ever write the shared file.
//!
//! # The hazard
//! A private mapping still shows later writes to the file in pages it has not copied yet. The caller must keep the
//! source unchanged for as long as a view lives: hold Ray's buffer (the object stays pinned and sealed objects are
//! never written), a pinned pool entry (never rewritten in place), a lease (written by nobody after publication).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use memmap2::{MmapMut, MmapOptions};

/// A way to reopen the file behind a shared mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/proc/self/map_files/<start>-<end>`: the mapping itself (needs CAP_CHECKPOINT_RESTORE or root).
    MapFiles = 0,
    /// The path named in `/proc/self/maps`, when the file has not been unlinked.
    Path = 1,
    /// `/proc/<pid>/fd/<n>` of a process given as a hint (e.g. Ray's raylet, which keeps the store open).
    ProcFd = 2,
}

impl Route {
    /// Every route, in the order they are tried.
    pub const ALL: [Route; 3] = [Route::MapFiles, Route::Path, Route::ProcFd];

    /// The route's name: `"map_files"`, `"path"` or `"proc_fd"`.
    pub fn name(self) -> &'static str {
        match self {
            Route::MapFiles => "map_files",
            Route::Path => "path",
            Route::ProcFd => "proc_fd",
        }
    }

    /// The route called `name`, if any.
    pub fn from_name(name: &str) -> Option<Route> {
        Route::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Why no private view could be made; the caller falls back to a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// The buffer is empty.
    Empty,
    /// No mapping covers the address (or `/proc/self/maps` could not be read).
    NotMapped {
        /// What the kernel said.
        reason: String,
    },
    /// The mapping is anonymous or private: its bytes are not the file's.
    NotShared,
    /// The buffer runs past the end of the mapping that holds its first byte.
    Spans,
    /// Every allowed route failed for this file.
    NoFile {
        /// What each route said.
        reason: String,
    },
    /// Mapping the file privately failed.
    Map {
        /// The error of `mmap`/`mprotect`.
        reason: String,
    },
    /// The private mapping does not show the source's bytes (the file is not what the address maps).
    Mismatch,
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRoute::Empty => write!(f, "the buffer is empty"),
            NoRoute::NotMapped { reason } => {
                write!(f, "no file mapping covers the buffer: {reason}")
            }
            NoRoute::NotShared => write!(f, "the buffer is not in a shared file mapping"),
            NoRoute::Spans => write!(f, "the buffer spans more than one mapping"),
            NoRoute::NoFile { reason } => {
                write!(f, "the mapped file could not be reopened: {reason}")
            }
            NoRoute::Map { reason } => write!(f, "mapping the file privately failed: {reason}"),
            NoRoute::Mismatch => write!(f, "the reopened file does not hold the buffer's bytes"),
        }
    }
}

impl std::error::Error for NoRoute {}

/// The mapping that covers an address, as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    /// First address of the mapping.
    pub start: usize,
    /// One past its last address.
    pub end: usize,
    /// File offset of `start`, in bytes.
    pub offset: u64,
    /// Device of the file (major, minor).
    pub dev: (u32, u32),
    /// Inode of the file (0 for anonymous memory).
    pub ino: u64,
    /// `MAP_SHARED`.
    pub shared: bool,
    /// The path shown by `/proc/self/maps` (`None` for anonymous mappings; may end in `" (deleted)"`).
    pub path: Option<String>,
}

/// A private, writeable mapping of some bytes of a file: `len` bytes at `as_mut_ptr()`. Unmapped on drop.
#[derive(Debug)]
pub struct PrivateMap {
    map: MmapMut,
}

impl PrivateMap {
    /// The first byte of the view (memmap2 maps the enclosing pages and points at the inner offset).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The first byte of the view.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Length of the view in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the view is empty (never: empty buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Counters of [`Resolver`], for stats and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivateStats {
    /// Private views made.
    pub views: u64,
    /// Requests that found no route (the caller copied).
    pub fallbacks: u64,
    /// Files resolved, by route (indexed by `Route as usize`).
    pub resolved: [u64; 3],
    /// Files resolved and cached now.
    pub cached_files: usize,
    /// Why the last request fell back, if one did.
    pub last_failure: Option<String>,
}

/// Upper bound on the files remembered (each keeps one descriptor open); the oldest is forgotten first.
const MAX_FILES: usize = 64;

/// What is known about one mapped file.
#[derive(Debug)]
struct Known {
    dev: (u32, u32),
    ino: u64,
    /// The reopened file, or why it could not be reopened (not retried until the routes change or a request
    /// brings a process to look in that was not tried).
    file: Result<File, String>,
    /// The processes searched by the `proc_fd` route when it failed.
    tried: Vec<u32>,
}

#[derive(Debug)]
struct State {
    routes: [bool; 3],
    files: Vec<Known>,
    /// `/proc/self/maps` opened by this process (a forked child must open its own), and whether the kernel answers
    /// `PROCMAP_QUERY` on it.
    maps: Option<(u32, File, bool)>,
    last_failure: Option<String>,
}

/// Resolves addresses to files and makes private views. One per process: [`resolver`].
#[derive(Debug)]
pub struct Resolver {
    state: Mutex<State>,
    views: AtomicU64,
    fallbacks: AtomicU64,
    resolved: [AtomicU64; 3],
}

/// The process's resolver.
pub fn resolver() -> &'static Resolver {
    static RESOLVER: LazyLock<Resolver> = LazyLock::new(|| Resolver::new([true; 3]));
    &RESOLVER
}

impl Resolver {
    /// A resolver that tries the routes marked `true` (indexed by `Route as usize`), knowing no file yet.
    fn new(routes: [bool; 3]) -> Resolver {
        Resolver {
            state: Mutex::new(State {
                routes,
                files: Vec::new(),
                maps: None,
                last_failure: None,
            }),
            views: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            resolved: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allows only `routes` from now on (all of them with `None`; none at all forces every request to fall back)
    /// and forgets every resolved file.
    pub fn set_routes(&self, routes: Option<&[Route]>) {
        let mut st = self.lock();
        st.routes = match routes {
            None => [true; 3],
            Some(rs) => {
                let mut on = [false; 3];
                for r in rs {
                    on[*r as usize] = true;
                }
                on
            }
        };
        st.files.clear();
    }

    /// The counters.
    pub fn stats(&self) -> PrivateStats {
        let st = self.lock();
        PrivateStats {
            views: self.views.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            resolved: std::array::from_fn(|i| self.resolved[i].load(Ordering::Relaxed)),
            cached_files: st.files.iter().filter(|k| k.file.is_ok()).count(),
            last_failure: st.last_failure.clone(),
        }
    }

    /// A private, writeable mapping of the file pages behind `src`, which must lie in one shared file mapping of
    /// this process. `hint_pids` are processes that may keep the file open (the `proc_fd` route). With `populate`
    /// the page tables are filled read-only up front (no copy), so that reads take no page faults.
    ///
    /// The result shows `src`'s bytes as long as nobody writes the source (see the module's hazard).
    pub fn private_view(
        &self,
        src: &[u8],
        hint_pids: &[u32],
        populate: bool,
    ) -> Result<PrivateMap, NoRoute> {
        let result = self.try_view(src, hint_pids, populate);
        match &result {
            Ok(_) => {
                self.views.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.lock().last_failure = Some(e.to_string());
            }
        }
        result
    }

    fn try_view(
        &self,
        src: &[u8],
        hint_pids: &[u32],
        populate: bool,
    ) -> Result<PrivateMap, NoRoute> {
        if src.is_empty() {
            return Err(NoRoute::Empty);
        }
        let addr = src.as_ptr() as usize;
        let mut st = self.lock();
        let vma = st.query(addr)?;
        if !vma.shared || vma.ino == 0 {
            return Err(NoRoute::NotShared);
        }
        let end = addr.checked_add(src.len()).ok_or(NoRoute::Spans)?;
        if end > vma.end {
            return Err(NoRoute::Spans);
        }
        let offset = vma.offset + (addr - vma.start) as u64;
        let file = st.file_for(self, &vma, hint_pids)?;
        let mut opts = MmapOptions::new();
        opts.offset(offset).len(src.len());
        if populate {
            opts.populate();
        }
        // SAFETY: a MAP_PRIVATE mapping of `file`: writes through it stay in this process. The bytes can change
        // under it only if someone writes the file, which the caller's contract (see the module docs) excludes for
        // as long as the view lives; `Mmap` unmaps on drop and hands out no references by itself.
        let ro = unsafe { opts.map_copy_read_only(file) }.map_err(|e| NoRoute::Map {
            reason: e.to_string(),
        })?;
        drop(st);
        // Populated read-only above, writeable from here on: each first write to a page copies that page alone.
        let map = ro.make_mut().map_err(|e| NoRoute::Map {
            reason: e.to_string(),
        })?;
        // A cheap check that the arithmetic found the right bytes: the first and last bytes of the view.
        let edge = src.len().min(64);
        let tail = src.len() - edge;
        if map[..edge] != src[..edge] || map[tail..] != src[tail..] {
            return Err(NoRoute::Mismatch);
        }
        Ok(PrivateMap { map })
    }
}

impl State {
    /// The mapping that covers `addr`.
    fn query(&mut self, addr: usize) -> Result<Vma, NoRoute> {
        let pid = std::process::id();
        if self.maps.as_ref().is_none_or(|(p, _, _)| *p != pid) {
            let f = File::open("/proc/self/maps").map_err(|e| NoRoute::NotMapped {
                reason: format!("/proc/self/maps: {e}"),
            })?;
            self.maps = Some((pid, f, true));
        }
        let (_, maps, ioctl_ok) = self.maps.as_mut().expect("set just above");
        if *ioctl_ok {
            match procmap_query(maps, addr) {
                Ok(v) => return Ok(v),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                    return Err(NoRoute::NotMapped {
                        reason: "no mapping at this address".into(),
                    })
                }
                // ENOTTY / EINVAL: a kernel before 6.11; read the text instead from now on.
                Err(_) => *ioctl_ok = false,
            }
        }
        let mut text = String::new();
        File::open("/proc/self/maps")
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| NoRoute::NotMapped {
                reason: format!("/proc/self/maps: {e}"),
            })?;
        text.lines()
            .filter_map(parse_maps_line)
            .find(|v| v.start <= addr && addr < v.end)
            .ok_or_else(|| NoRoute::NotMapped {
                reason: "no mapping at this address".into(),
            })
    }

    /// The file mapped by `vma`, reopened by the first allowed route that works (remembered per device and inode).
    fn file_for(&mut self, r: &Resolver, vma: &Vma, hint_pids: &[u32]) -> Result<&File, NoRoute> {
        let mut found = self
            .files
            .iter()
            .position(|k| k.dev == vma.dev && k.ino == vma.ino);
        if let Some(i) = found {
            let k = &self.files[i];
            if k.file.is_err() && hint_pids.iter().any(|p| !k.tried.contains(p)) {
                // A failure is retried once a request names a process that was not searched yet.
                self.files.remove(i);
                found = None;
            }
        }
        let idx = match found {
            Some(i) => i,
            None => {
                let file = match open_file(self.routes, vma, hint_pids) {
                    Ok((f, route)) => {
                        r.resolved[route as usize].fetch_add(1, Ordering::Relaxed);
                        Ok(f)
                    }
                    Err(reason) => Err(reason),
                };
                if self.files.len() >= MAX_FILES {
                    self.files.remove(0);
                }
                self.files.push(Known {
                    dev: vma.dev,
                    ino: vma.ino,
                    file,
                    tried: hint_pids.to_vec(),
                });
                self.files.len() - 1
            }
        };
        self.files[idx]
            .file
            .as_ref()
            .map_err(|reason| NoRoute::NoFile {
                reason: reason.clone(),
            })
    }
}

/// Opens the file of `vma` read-only by the first allowed route whose file has the mapping's device and inode.
fn open_file(routes: [bool; 3], vma: &Vma, hint_pids: &[u32]) -> Result<(File, Route), String> {
    let mut why = Vec::new();
    let attempt = |route: Route, path: &str, why: &mut Vec<String>| -> Option<(File, Route)> {
        match File::open(path) {
            Ok(f) if same_file(&f, vma) => Some((f, route)),
            Ok(_) => {
                why.push(format!("{}: {path} is another file", route.name()));
                None
            }
            Err(e) => {
                why.push(format!("{}: {path}: {e}", route.name()));
                None
            }
        }
    };
    if routes[Route::MapFiles as usize] {
        let p = format!("/proc/self/map_files/{:x}-{:x}", vma.start, vma.end);
        if let Some(hit) = attempt(Route::MapFiles, &p, &mut why) {
            return Ok(hit);
        }
    }
    if routes[Route::Path as usize] {
        match vma.path.as_deref() {
            Some(p) if p.starts_with('/') && !p.ends_with(" (deleted)") => {
                if let Some(hit) = attempt(Route::Path, p, &mut why) {
                    return Ok(hit);
                }
            }
            _ => why.push("path: the file has no name any more".into()),
        }
    }
    if routes[Route::ProcFd as usize] {
        for &pid in hint_pids {
            let dir = format!("/proc/{pid}/fd");
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    why.push(format!("proc_fd: {dir}: {e}"));
                    continue;
                }
            };
            for entry in entries.flatten() {
                let path = entry.path();
                // stat follows the link to the open file: compare before opening anything.
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                if meta.ino() == vma.ino && dev_of(meta.dev()) == vma.dev {
                    if let Some(hit) = attempt(Route::ProcFd, &path.to_string_lossy(), &mut why) {
                        return Ok(hit);
                    }
                }
            }
            why.push(format!(
                "proc_fd: no descriptor of pid {pid} opens the file"
            ));
        }
        if hint_pids.is_empty() {
            why.push("proc_fd: no process to look in".into());
        }
    }
    if why.is_empty() {
        why.push("every route is disabled".into());
    }
    Err(why.join("; "))
}

fn same_file(f: &File, vma: &Vma) -> bool {
    match rustix::fs::fstat(f.as_fd()) {
        Ok(st) => st.st_ino == vma.ino && dev_of(st.st_dev) == vma.dev,
        Err(_) => false,
    }
}

fn dev_of(dev: u64) -> (u32, u32) {
    (rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// `struct procmap_query` of `<linux/fs.h>` (Linux 6.11).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const PROCMAP_QUERY: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<ProcmapQuery>(b'f', 17);
const PROCMAP_QUERY_VMA_SHARED: u64 = 8;

/// One `PROCMAP_QUERY`: the mapping that covers `addr` exactly (no "or next"), with its name.
fn procmap_query(maps: &File, addr: usize) -> io::Result<Vma> {
    let mut name = [0u8; 4096];
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr as u64,
        vma_name_size: name.len() as u32,
        vma_name_addr: name.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: PROCMAP_QUERY reads and writes exactly one `struct procmap_query`, whose layout `ProcmapQuery`
    // reproduces (`size` tells the kernel which version we pass); the only pointer in it, `vma_name_addr`, points
    // to `name`, a live buffer of `vma_name_size` bytes, and `build_id_size` is 0 so `build_id_addr` is not used.
    let ctl = unsafe { rustix::ioctl::Updater::<PROCMAP_QUERY, ProcmapQuery>::new(&mut q) };
    // SAFETY: the opcode and argument type match (above); `maps` is an open /proc/<pid>/maps.
    unsafe { rustix::ioctl::ioctl(maps, ctl) }.map_err(io::Error::from)?;
    let path = if q.vma_name_size > 0 {
        let n = (q.vma_name_size as usize).min(name.len());
        let s = &name[..n];
        let s = s.strip_suffix(&[0]).unwrap_or(s);
        Some(String::from_utf8_lossy(s).into_owned())
    } else {
        None
    };
    Ok(Vma {
        start: q.vma_start as usize,
        end: q.vma_end as usize,
        offset: q.vma_offset,
        dev: (q.dev_major, q.dev_minor),
        ino: q.inode,
        shared: q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0,
        path,
    })
}

/// One line of `/proc/<pid>/maps`: `start-end perms offset major:minor inode [path]`.
pub fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let ino = fields.next()?;
    let path = fields.next().map(str::trim_start).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(Vma {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        ino: ino.parse().ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        path: path.map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::{unlink, Segment};

    fn seg(tag: &str, len: u64) -> Segment {
        let name = format!("tenso_private_test_{tag}_{}", std::process::id());
        let _ = unlink(&name);
        Segment::create(&name, len, 0o600, false).expect("create segment")
    }

    #[expect(
        clippy::mut_from_ref,
        reason = "the bytes are the shared mapping's, not the Segment value's; each test is its segment's only user"
    )]
    fn bytes_of(s: &Segment) -> &mut [u8] {
        // SAFETY: the test is the only user of its segment, and the slice does not outlive `s`.
        unsafe { std::slice::from_raw_parts_mut(s.as_ptr(), s.len()) }
    }

    #[test]
    fn parses_maps_lines() {
        let v = parse_maps_line(
            "7f00a000-7f00c000 rw-s 00003000 00:1a 12345                      /dev/shm/plasmaAB (deleted)",
        )
        .expect("parses");
        assert_eq!((v.start, v.end, v.offset), (0x7f00a000, 0x7f00c000, 0x3000));
        assert_eq!((v.dev, v.ino, v.shared), ((0, 0x1a), 12345, true));
        assert_eq!(v.path.as_deref(), Some("/dev/shm/plasmaAB (deleted)"));
        let anon = parse_maps_line("7f00a000-7f00c000 rw-p 00000000 00:00 0 ").expect("parses");
        assert!(!anon.shared && anon.path.is_none() && anon.ino == 0);
        assert!(parse_maps_line("garbage").is_none());
    }

    #[test]
    fn ioctl_and_text_agree() {
        let s = seg("agree", 1 << 16);
        let addr = s.as_ptr() as usize + 5000;
        let maps = File::open("/proc/self/maps").expect("maps");
        let mut text = String::new();
        File::open("/proc/self/maps")
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read maps");
        let from_text = text
            .lines()
            .filter_map(parse_maps_line)
            .find(|v| v.start <= addr && addr < v.end)
            .expect("mapped");
        match procmap_query(&maps, addr) {
            Ok(v) => assert_eq!(v, from_text),
            // Kernels before 6.11 have no PROCMAP_QUERY; the text path is what they use.
            Err(e) => assert!(
                matches!(e.raw_os_error(), Some(c) if c == rustix::io::Errno::NOTTY.raw_os_error()
                    || c == rustix::io::Errno::INVAL.raw_os_error()),
                "{e}"
            ),
        }
        assert!(from_text.shared && from_text.ino != 0);
        let _ = s.unlink();
    }

    #[test]
    fn writes_stay_private_and_reads_follow_the_source() {
        let s = seg("cow", 3 << 16);
        let shared = bytes_of(&s);
        for (i, b) in shared.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        // An unaligned range across several pages.
        let range = 1000..(2 << 16) + 77;
        let src = &shared[range.clone()];
        let mut view = resolver()
            .private_view(src, &[], false)
            .expect("a shared file mapping has a route");
        assert_eq!(view.len(), range.len());
        // SAFETY: the view is `len` bytes at `as_mut_ptr()`, alive for this scope.
        let v = unsafe { std::slice::from_raw_parts_mut(view.as_mut_ptr(), view.len()) };
        assert_eq!(&v[..], src);
        v[0] = 0xEE;
        v[v.len() - 1] = 0xEE;
        assert_eq!(
            shared[range.start],
            (range.start % 251) as u8,
            "a private write reached the shared bytes"
        );
        assert_eq!(shared[range.end - 1], ((range.end - 1) % 251) as u8);
        // A second private view does not see the first one's writes.
        let view2 = resolver()
            .private_view(&shared[range.clone()], &[], true)
            .expect("view");
        // SAFETY: as above.
        let v2 = unsafe { std::slice::from_raw_parts(view2.as_ptr(), view2.len()) };
        assert_eq!(v2[0], (range.start % 251) as u8);
        drop((view, view2));
        let _ = s.unlink();
    }

    #[test]
    fn anonymous_memory_has_no_route() {
        let heap = vec![7u8; 1 << 20];
        let before = resolver().stats().fallbacks;
        assert_eq!(
            resolver().private_view(&heap, &[], false).unwrap_err(),
            NoRoute::NotShared
        );
        assert!(resolver().stats().fallbacks > before);
        assert_eq!(
            resolver().private_view(&[], &[], false).unwrap_err(),
            NoRoute::Empty
        );
    }

    #[test]
    fn proc_fd_route_finds_a_deleted_file_through_a_holder() {
        // A deleted file that this process keeps open (the way the raylet keeps Ray's store): only proc_fd works.
        let s = seg("procfd", 1 << 16);
        let fd_holder = File::open(format!("/dev/shm/{}", s.name())).expect("open");
        s.unlink().expect("unlink");
        bytes_of(&s)[100] = 9;
        // A private resolver, so that the process-wide one's routes stay as they are for the other tests.
        let r = Resolver::new([false, true, true]);
        let src = &bytes_of(&s)[64..4096];
        let err = r.private_view(src, &[], false).unwrap_err();
        assert!(matches!(err, NoRoute::NoFile { .. }), "{err}");
        // A failure is remembered per file, and retried once a request names a process not searched yet.
        let view = r
            .private_view(src, &[std::process::id()], false)
            .expect("through our own fd");
        // SAFETY: the view is `len` bytes, alive for this scope.
        assert_eq!(unsafe { *view.as_ptr().add(36) }, 9);
        assert_eq!(r.stats().resolved[Route::ProcFd as usize], 1);
        drop((view, fd_holder));
    }
}
