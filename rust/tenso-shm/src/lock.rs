//! The pool's lock word: a spin/sleep lock in shared memory that survives the death of its holder.
//!
//! ```text
//!  63            32 31             0
//! +----------------+----------------+
//! |  owner pid     |  epoch         |   owner pid 0 = free; epoch += 1 on every acquisition
//! +----------------+----------------+
//! ```
//! A waiter that has waited a while checks whether the owner still exists (`kill(pid, 0)`, and `/proc/<pid>/stat`
//! for zombies, which `kill` still reports as alive). If it is gone, the waiter takes the lock over with a
//! compare-and-swap against the exact word it saw (the epoch makes that word unique, so two waiters cannot both
//! steal it and a late release by an old owner cannot free a newer one) and is told to repair the structures the
//! dead owner may have left half-changed ([`Acquired::recovered`]).
//!
//! Limits: all processes must share a PID namespace (a pid from another namespace looks dead), and a process that
//! is stopped (SIGSTOP) while holding the lock blocks the others until it continues, as any lock would. A dead
//! owner's pid being reused by an unrelated process before anyone notices keeps the lock held until that process
//! exits; Linux hands out pids in increasing order, so this needs the pid space to wrap first.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long a waiter waits between liveness checks of the owner.
const CHECK_EVERY: Duration = Duration::from_millis(2);

/// The result of [`acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// The word we wrote; [`release`] needs it.
    pub token: u64,
    /// The previous owner died holding the lock: the protected data may be inconsistent.
    pub recovered: bool,
}

/// This process's id, cached (0: not known yet). getpid is a system call, and every lock, pin and unpin needs the
/// id: the first call of a process asks the kernel and registers [`forget_pid`] as a `pthread_atfork` child handler,
/// so the child of every `fork(2)` that goes through the C library (Python's `os.fork`, `multiprocessing`, ...)
/// asks again.
static PID: AtomicU32 = AtomicU32::new(0);

/// Registers the `fork` child handler once per process (a child inherits the registration with the memory).
static AT_FORK: Once = Once::new();

// The C library's (std links it on every Unix target); declared here as rustix has no binding for it.
unsafe extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> std::ffi::c_int;
}

/// A `fork` handler: a plain function the C library calls around every `fork(2)` it performs.
pub type ForkHandler = Option<extern "C" fn()>;

/// Registers `fork` handlers with the C library (`pthread_atfork`): `prepare` runs in the forking thread just before
/// the fork, `parent` and `child` just after it, in each process. Every `fork` that goes through the C library runs
/// them (Python's `os.fork`, `multiprocessing`); a child inherits the registration. Registering twice runs the
/// handlers twice, so callers register once per process (a `Once`). The `child` handler runs in a process with one
/// thread, whose memory is a copy of the parent's: it must only do what is safe there (atomics, unlocking a lock
/// that `prepare` took). Returns false if the C library refused (out of memory), or under Miri (no `fork` there).
pub fn register_at_fork(prepare: ForkHandler, parent: ForkHandler, child: ForkHandler) -> bool {
    if cfg!(miri) {
        return false;
    }
    // SAFETY: the handlers are plain `extern "C"` functions without arguments, as pthread_atfork expects; what each
    // does around a fork is the registering caller's contract (documented above). Registering has no other
    // precondition.
    unsafe { pthread_atfork(prepare, parent, child) == 0 }
}

extern "C" fn forget_pid_in_child() {
    forget_pid();
}

/// Forgets the cached process id: the next [`current_pid`] asks the kernel. `fork` children do this by themselves
/// (see [`current_pid`]); the Python bindings also call it from `os.register_at_fork`, which costs nothing extra.
pub fn forget_pid() {
    PID.store(0, Ordering::Relaxed);
}

/// This process's id (cached: see [`PID`]).
pub fn current_pid() -> u32 {
    let pid = PID.load(Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    let pid = rustix::process::getpid().as_raw_nonzero().get() as u32;
    if cfg!(miri) {
        return pid; // Miri has no pthread_atfork (and never forks): no cache
    }
    AT_FORK.call_once(|| {
        // The handler only stores to an atomic, which is async-signal-safe as a fork child handler must be.
        let ok = register_at_fork(None, None, Some(forget_pid_in_child));
        debug_assert!(ok, "pthread_atfork failed");
    });
    if AT_FORK.is_completed() {
        PID.store(pid, Ordering::Relaxed);
    }
    pid
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if cfg!(miri) {
        // Miri cannot signal processes; its tests involve only this one.
        return pid == current_pid();
    }
    let Some(raw) = rustix::process::Pid::from_raw(pid as i32) else {
        return false;
    };
    match rustix::process::test_kill_process(raw) {
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(_) => return false,
    }
    // A killed child stays a zombie until its parent reaps it, and kill(2) still finds it.
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.iter().rposition(|&b| b == b')') {
            Some(i) => !matches!(stat.get(i + 2), Some(b'Z') | Some(b'X')),
            None => true,
        },
        Err(_) => true,
    }
}

fn locked_word(pid: u32, prev: u64) -> u64 {
    (u64::from(pid) << 32) | u64::from((prev as u32).wrapping_add(1))
}

/// Tries once to take a free lock.
pub fn try_acquire(word: &AtomicU64, pid: u32) -> Option<Acquired> {
    let cur = word.load(Ordering::Relaxed);
    if cur >> 32 != 0 {
        return None;
    }
    let next = locked_word(pid, cur);
    word.compare_exchange(cur, next, Ordering::Acquire, Ordering::Relaxed)
        .ok()
        .map(|_| Acquired {
            token: next,
            recovered: false,
        })
}

/// Takes the lock, waiting (spin, then yield, then sleep) while a live process holds it, and taking it over from a
/// dead one.
pub fn acquire(word: &AtomicU64, pid: u32) -> Acquired {
    let mut spins = 0u32;
    let mut last_check: Option<(u64, Instant)> = None;
    loop {
        let cur = word.load(Ordering::Relaxed);
        let owner = (cur >> 32) as u32;
        if owner == 0 {
            let next = locked_word(pid, cur);
            if word
                .compare_exchange_weak(cur, next, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Acquired {
                    token: next,
                    recovered: false,
                };
            }
            continue;
        }
        // Check the owner's liveness once the same word has been held for CHECK_EVERY.
        match last_check {
            Some((seen, since)) if seen == cur => {
                if since.elapsed() >= CHECK_EVERY {
                    if owner != pid && !process_alive(owner) {
                        let next = locked_word(pid, cur);
                        if word
                            .compare_exchange(cur, next, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                        {
                            return Acquired {
                                token: next,
                                recovered: true,
                            };
                        }
                    }
                    last_check = Some((cur, Instant::now()));
                }
            }
            _ => last_check = Some((cur, Instant::now())),
        }
        backoff(&mut spins);
    }
}

/// Releases the lock if it is still ours (a lock taken over from us is left alone).
pub fn release(word: &AtomicU64, token: u64) {
    let free = u64::from(token as u32);
    let _ = word.compare_exchange(token, free, Ordering::Release, Ordering::Relaxed);
}

/// Waits a little longer each call: spins, then yields, then sleeps up to 200 µs.
pub(crate) fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    match *spins {
        0..=64 => std::hint::spin_loop(),
        65..=128 => std::thread::yield_now(),
        n => std::thread::sleep(Duration::from_micros(u64::from((n - 128).min(200)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn acquire_release() {
        let word = AtomicU64::new(0);
        let a = acquire(&word, 7);
        assert!(!a.recovered);
        assert_eq!(word.load(Ordering::Relaxed) >> 32, 7);
        assert!(try_acquire(&word, 8).is_none());
        release(&word, a.token);
        assert_eq!(word.load(Ordering::Relaxed) >> 32, 0);
        let b = try_acquire(&word, 8).unwrap();
        assert_ne!(a.token, b.token, "epochs differ");
        // A stale token (an old owner's) does not release the current holder.
        release(&word, a.token);
        assert_eq!(word.load(Ordering::Relaxed), b.token);
    }

    #[test]
    #[cfg_attr(miri, ignore = "spawns a process")]
    fn dead_owner_is_taken_over() {
        // Find a pid that does not exist: spawn a child, wait for it, and use its (now free) pid.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(!process_alive(dead));
        let word = AtomicU64::new(locked_word(dead, 41));
        let got = acquire(&word, current_pid());
        assert!(got.recovered);
        assert_eq!(word.load(Ordering::Relaxed) >> 32, u64::from(current_pid()));
    }

    #[test]
    #[cfg_attr(miri, ignore = "spawns a process")]
    fn zombie_counts_as_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(100)); // exited, not reaped: a zombie
        assert!(!process_alive(pid));
        child.wait().unwrap();
    }

    #[test]
    fn mutual_exclusion_under_threads() {
        let word = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (word, counter) = (word.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let g = acquire(&word, current_pid());
                        // A non-atomic read-modify-write: loses updates unless the lock excludes.
                        let v = counter.load(Ordering::Relaxed);
                        std::hint::spin_loop();
                        counter.store(v + 1, Ordering::Relaxed);
                        release(&word, g.token);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 8000);
    }
}
