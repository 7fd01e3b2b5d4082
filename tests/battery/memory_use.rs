//! Measuring how much popgate's memory grows while it serves a message.
//!
//! popgate runs in the test process. Under `cargo test` the scenarios run
//! in parallel threads of that one process, each with a popgate of its own:
//! each scenario holds a shared pass (`running`) for its whole run, and a
//! measurement runs `alone`, once every other scenario has given its pass
//! back and before any new one starts. (Under nextest each test is its own
//! process and the gate never waits.)
//!
//! Growth is measured twice:
//! - `heap`: the peak of the bytes live in the allocator on popgate's own
//!   threads (those that called `count_this_thread`: `crate::gateway` marks
//!   its runtime's) during the measurement, minus those live at its start.
//!   Exact, whatever the allocator keeps in reserve, and blind to the test
//!   client and to a store living in the test process (the HTTP API
//!   stand-ins build whole responses in memory). This is what is asserted.
//! - `resident`: the peak resident set of the whole process (VmHWM, reset
//!   through /proc/self/clear_refs) minus the resident set at the start.
//!   Reported only: it counts in-process stores too, and misses a buffer
//!   that reuses memory freed earlier and still resident (glibc keeps a freed
//!   top chunk that `malloc_trim` cannot give back).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The longest a scenario waits for its turn: every scenario's own waits
/// are bounded, so this is only reached if something is badly wrong.
const GATE_TIMEOUT: Duration = Duration::from_secs(300);

struct GateState {
    running: usize,
    alone_waiting: usize,
    alone: bool,
}

static GATE: Mutex<GateState> = Mutex::new(GateState { running: 0, alone_waiting: 0, alone: false });
static TURNS: Condvar = Condvar::new();

thread_local! {
    /// Whether this test's thread holds a shared pass.
    static HOLDS_PASS: Cell<bool> = const { Cell::new(false) };
}

fn gate() -> MutexGuard<'static, GateState> {
    GATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait_until(
    state: MutexGuard<'static, GateState>,
    what: &str,
    blocked: impl FnMut(&mut GateState) -> bool,
) -> MutexGuard<'static, GateState> {
    let (state, timeout) =
        TURNS.wait_timeout_while(state, GATE_TIMEOUT, blocked).unwrap_or_else(PoisonError::into_inner);
    assert!(!timeout.timed_out(), "waited {GATE_TIMEOUT:?} for {what}");
    state
}

/// A scenario's shared pass, given back on drop (a panic included).
pub struct Running(());

/// Waits while a measurement is running or waiting to run, then lets the
/// scenario run alongside the others.
pub fn running() -> Running {
    take_pass();
    Running(())
}

fn take_pass() {
    let mut state = wait_until(gate(), "a measurement to finish", |s| s.alone || s.alone_waiting > 0);
    state.running += 1;
    HOLDS_PASS.with(|held| held.set(true));
}

fn give_pass() {
    if HOLDS_PASS.with(|held| held.replace(false)) {
        gate().running -= 1;
        TURNS.notify_all();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        give_pass();
    }
}

/// How much memory grew during a measurement, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Growth {
    pub heap: u64,
    pub resident: u64,
}

/// Runs `measure` with no other scenario running in this process; returns
/// how much the process's memory grew during it, and what `measure` returned.
pub fn alone<T>(measure: impl FnOnce() -> T) -> (Growth, T) {
    let had_pass = HOLDS_PASS.with(Cell::get);
    if had_pass {
        give_pass();
    }
    let mut state = gate();
    state.alone_waiting += 1;
    let mut state = wait_until(state, "the other scenarios to finish", |s| s.alone || s.running > 0);
    state.alone_waiting -= 1;
    state.alone = true;
    drop(state);

    struct EndAlone;
    impl Drop for EndAlone {
        fn drop(&mut self) {
            gate().alone = false;
            TURNS.notify_all();
        }
    }
    let result = {
        let _end = EndAlone;
        let heap_start = LIVE.load(Ordering::SeqCst);
        PEAK.store(heap_start, Ordering::SeqCst);
        let resident_start = reset_peak_resident();
        let result = measure();
        let growth = Growth {
            heap: PEAK.load(Ordering::SeqCst).saturating_sub(heap_start).max(0) as u64,
            resident: (status_kib("VmHWM").saturating_sub(resident_start)) * 1024,
        };
        (growth, result)
    };
    if had_pass {
        take_pass();
    }
    result
}

/// Resets the peak resident set to the current one; returns it (KiB).
fn reset_peak_resident() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5")
        .unwrap_or_else(|e| panic!("resetting VmHWM through /proc/self/clear_refs (Linux ≥ 4.0): {e}"));
    status_kib("VmRSS")
}

/// A `kB` field of /proc/self/status.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Bytes live in the allocator on marked threads now (it may go below zero:
/// a marked thread can free what another allocated), and the most since the
/// last reset.
static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

thread_local! {
    /// Whether this thread's allocations are popgate's. A const, drop-free
    /// thread-local: reading it allocates nothing, so the allocator may.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// From now on, this thread's allocations count as popgate's.
pub fn count_this_thread() {
    COUNTED.with(|counted| counted.set(true));
}

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

/// The system allocator, counting.
struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

fn grew(bytes: usize) {
    if counted() {
        let live = LIVE.fetch_add(bytes as i64, Ordering::SeqCst) + bytes as i64;
        PEAK.fetch_max(live, Ordering::SeqCst);
    }
}

fn shrank(bytes: usize) {
    if counted() {
        LIVE.fetch_sub(bytes as i64, Ordering::SeqCst);
    }
}

// SAFETY: every call is passed on to `System` unchanged; the counters are
// only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are System's.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            grew(layout.size());
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from `System` with this layout.
        unsafe { System.dealloc(pointer, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `pointer` came from `System` with this layout.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        moved
    }
}
