//! A global allocator that counts the bytes in use and their peak, for tests that bound what a
//! piece of code allocates. A binary that uses it declares it (`#[global_allocator] static
//! ALLOC: alloc_count::Counting = alloc_count::Counting;`) and holds a single test, so that
//! nothing else allocates meanwhile.
#![allow(dead_code)] // each test binary uses a different subset

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every allocation and deallocation is System's, with the caller's layout unchanged,
// so the GlobalAlloc contract holds exactly as for System; the counters are atomics that never
// allocate (and realloc, left to the default, goes through these two).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract (non-zero size), which
        // is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr was allocated by `alloc` above, i.e. by System, with this layout (our
        // caller's contract).
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

/// `f()`, and the most bytes in use while it ran beyond those in use before.
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst).saturating_sub(base))
}

/// Bytes in use now.
pub fn in_use() -> usize {
    CURRENT.load(Ordering::SeqCst)
}
