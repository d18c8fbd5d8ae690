//! The allocator's one setting a simulated run needs.
//!
//! `tcore` and the throughput benchmark run on mimalloc. By default mimalloc gives memory the
//! process freed back to the OS one wall second later, and a run faults it in again, zeroed
//! by the kernel, as soon as the next wave of users arrives: concert-open gives back and
//! refaults about 650 MiB that way. A run is a batch job whose heap peaks and then ends, so
//! it keeps what it freed for reuse instead.
//!
//! **Invariant:** this is the only `unsafe` in the workspace, and it changes no result: a run
//! reads no address and no allocator state.

/// mimalloc's `mi_option_purge_delay` (v3's `mi_option_t` numbering; `libmimalloc-sys` has no
/// constant for it): how many milliseconds after a free memory goes back to the OS, `-1` for
/// never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc keep the memory the process frees instead of giving it back to the OS.
/// Call it first thing in `main`, before any other thread starts: mimalloc's options are not
/// synchronised.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores one integer in mimalloc's option table; it takes no
    // pointer. Callers run it before starting any thread, so no other thread reads the table
    // while it is written.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is the purge delay: mimalloc's default for it (1,000 ms, which no
    /// other option has) before the call, and never purge after it.
    #[test]
    #[allow(unsafe_code)]
    fn the_option_set_is_the_purge_delay() {
        // SAFETY: reads one integer from mimalloc's option table; no pointer. The test binary
        // allocates with the system allocator, so nothing else in it reads the table.
        let get = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 1_000);
        }
        keep_freed_memory();
        assert_eq!(get(), -1);
    }
}
