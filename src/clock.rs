//! Time and randomness for the controller, replaceable in tests: the reconcile core
//! is tested with tokio's paused time, where an hour passes in no time at all.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// A number in [0, 1), for jitter.
    fn jitter(&self) -> f64;
    fn now(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// The wall clock, and jitter from a generator seeded by the kernel.
pub struct SystemClock {
    rng: Mutex<u64>,
}

impl Default for SystemClock {
    fn default() -> Self {
        let mut seed = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let seed = u64::from_le_bytes(seed) | 1;
        SystemClock {
            rng: Mutex::new(seed),
        }
    }
}

fn xorshift(x: &mut u64) -> f64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x >> 11) as f64 / (1u64 << 53) as f64
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
    fn jitter(&self) -> f64 {
        xorshift(&mut self.rng.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Tokio's clock (pausable in tests) from a fixed Unix start, and repeatable jitter.
pub struct TokioClock {
    start_ms: u64,
    origin: tokio::time::Instant,
    rng: Mutex<u64>,
}

impl TokioClock {
    pub fn new(start_unix_secs: u64) -> TokioClock {
        TokioClock {
            start_ms: start_unix_secs * 1000,
            origin: tokio::time::Instant::now(),
            rng: Mutex::new(0x9e37_79b9_7f4a_7c15),
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.start_ms + self.origin.elapsed().as_millis() as u64
    }
    fn jitter(&self) -> f64 {
        xorshift(&mut self.rng.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
