//! How a simulated run sets up its memory.
//!
//! `tcore` and the throughput benchmark run on mimalloc. A run is a batch job whose heap
//! grows to its peak (a spike's waiting fans) and then ends, and two defaults cost it time:
//!
//! - mimalloc gives memory the process freed back to the OS one wall second later, and the
//!   run faults it in again, zeroed by the kernel, when the next wave of users arrives:
//!   concert-open gave back and refaulted about 650 MiB that way. A run keeps what it freed.
//! - mimalloc asks for transparent huge pages, and a kernel that compacts memory to find a
//!   free 2 MiB page on first touch (`defrag` = `madvise`, the usual default) spends system
//!   time on that. For a heap of a few hundred MiB it costs more than the TLB saves:
//!   concert-open (100,000 users, 560 MB) spent 0.9–1.3 s of system time against 0.3 s with
//!   4 KiB pages, and ran no faster. A heap of gigabytes is the other way round: 4 KiB pages
//!   map so little of it that TLB misses cost more: the million-user spike (7.4 GB) ran in
//!   197–204 s with huge pages against 217–232 s without. So a run asks for no huge pages
//!   unless it has at least [`HUGE_PAGES_FROM_USERS`] users ([`size_pages_for`]).
//!
//! **Invariant:** this is the only `unsafe` in the workspace, and nothing here changes a
//! result: a run reads no address and no allocator state.

/// mimalloc's `mi_option_purge_delay` (v3's `mi_option_t` numbering; `libmimalloc-sys` has no
/// constant for it): how many milliseconds after a free memory goes back to the OS, `-1` for
/// never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The fewest users of a run that allows transparent huge pages (see the module's
/// documentation).
pub const HUGE_PAGES_FROM_USERS: u64 = 500_000;

/// Sets the process up for a run: freed memory is kept, and no transparent huge pages until
/// [`size_pages_for`] allows them. Call it first thing in `main`, before any other thread
/// starts: mimalloc's options are not synchronised.
pub fn configure_for_a_run() {
    keep_freed_memory();
    allow_huge_pages(false);
}

/// Allows transparent huge pages for what the process touches from now on when the run about
/// to start has at least [`HUGE_PAGES_FROM_USERS`] users, and forbids them otherwise. Whether
/// it may is the process's flag, read at each page fault, so it can change between runs.
pub fn size_pages_for(users: u64) {
    allow_huge_pages(users >= HUGE_PAGES_FROM_USERS);
}

fn allow_huge_pages(allowed: bool) {
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(!allowed) {
        tracing::debug!(%error, "transparent huge pages stay as the system has them");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = allowed;
}

/// Makes mimalloc keep the memory the process frees instead of giving it back to the OS.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores one integer in mimalloc's option table; it takes no
    // pointer. Callers run it before starting any thread, so no other thread reads the table
    // while it is written.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is the purge delay: mimalloc's default for it (1,000 ms, which no
    /// other option has) before the call, and never purge after it; and the process has asked
    /// for no huge pages, until a run of many users is sized.
    #[test]
    #[allow(unsafe_code)]
    fn a_run_keeps_freed_memory_and_asks_for_no_huge_pages() {
        // SAFETY: reads one integer from mimalloc's option table; no pointer. The test binary
        // allocates with the system allocator, so nothing else in it reads the table.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 1_000);
        }
        configure_for_a_run();
        assert_eq!(get(), -1);
        #[cfg(target_os = "linux")]
        {
            assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
            // Only a run of many users allows them, and a smaller run after it forbids them
            // again. (One test: the flag is the whole process's.)
            size_pages_for(HUGE_PAGES_FROM_USERS);
            assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(false));
            size_pages_for(HUGE_PAGES_FROM_USERS - 1);
            assert_eq!(nix::sys::prctl::get_thp_disable(), Ok(true));
        }
    }
}
