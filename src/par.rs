//! Data parallelism over the machine's cores, for the few passes that touch every host.
//! Scoped threads from std: a pool crate would be more than these three call sites need.

/// Below this many items, threads cost more than they save.
const MIN_PARALLEL: usize = 4096;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `f` over contiguous chunks of `items`, results concatenated in order.
pub fn map_chunks<T: Sync, R: Send>(items: &[T], f: impl Fn(&[T]) -> Vec<R> + Sync) -> Vec<R> {
    map_chunks_if(items.len() >= MIN_PARALLEL, items, f)
}

/// [`map_chunks`], on several threads only when `worth_it`.
pub fn map_chunks_if<T: Sync, R: Send>(
    worth_it: bool,
    items: &[T],
    f: impl Fn(&[T]) -> Vec<R> + Sync,
) -> Vec<R> {
    let n = threads();
    if n < 2 || items.len() < 2 || !worth_it {
        return f(items);
    }
    let size = items.len().div_ceil(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = items.chunks(size).map(|c| s.spawn(|| f(c))).collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                // A panic in `f` is a bug; surface it where it happened.
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        out
    })
}

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by a process that runs one command and exits: it need not free what it built.
static EXITING: AtomicBool = AtomicBool::new(false);

/// For `main`: this process ends after one command, so large values need not be freed.
pub fn one_shot_process() {
    EXITING.store(true, Ordering::Relaxed);
}

/// Free a large value on another thread, so the caller does not wait for it (a fleet
/// of 100,000 hosts takes tens of milliseconds to drop) and its memory is reused.
pub fn drop_later<T: Send + 'static>(value: T) {
    std::thread::spawn(move || drop(value));
}

/// Done with a value at the end of a command: a one-shot process leaves it to the OS.
pub fn discard<T: Send + 'static>(value: T) {
    if EXITING.load(Ordering::Relaxed) {
        std::mem::forget(value);
    } else {
        drop(value);
    }
}
