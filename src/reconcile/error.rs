//! Why a host is not moving, and what that means for retrying.
//!
//! - Stalled: nothing changes until a new commit or a person (`fleetwave retry`):
//!   an invalid fleet, an image with no version, a host out of retries.
//! - Waiting: it goes on by itself at a time or on an event: a wave gate, a
//!   maintenance window, a capture still to come.
//! - Transient: the last attempt failed; retried after a backoff that doubles, with
//!   jitter so a room of failed machines does not come back at one instant.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Hold {
    Stalled {
        reason: String,
        message: String,
    },
    Waiting {
        reason: String,
        message: String,
        /// Unix seconds, when known.
        until: Option<u64>,
    },
    Transient {
        reason: String,
        message: String,
        /// Unix seconds of the next attempt.
        retry_at: u64,
    },
}

impl Hold {
    pub fn reason(&self) -> &str {
        match self {
            Hold::Stalled { reason, .. }
            | Hold::Waiting { reason, .. }
            | Hold::Transient { reason, .. } => reason,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Hold::Stalled { message, .. }
            | Hold::Waiting { message, .. }
            | Hold::Transient { message, .. } => message,
        }
    }
}

/// How failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one step before the host is Stalled.
    pub attempts: u32,
    /// The first backoff, in seconds; it doubles per failure.
    pub base_secs: u64,
    pub max_secs: u64,
    /// A booted agent silent this long has failed (powered off, crashed).
    pub silence_secs: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            base_secs: 30,
            max_secs: 1800,
            silence_secs: 600,
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`-th failure, with `jitter` in [0, 1) spreading it
    /// by up to a fifth either way.
    pub fn backoff(&self, failures: u32, jitter: f64) -> u64 {
        let exp = failures.saturating_sub(1).min(20);
        let base = self
            .base_secs
            .saturating_mul(1u64 << exp)
            .min(self.max_secs) as f64;
        let spread = base * 0.2 * (2.0 * jitter.clamp(0.0, 1.0) - 1.0);
        (base + spread).round().max(1.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_jitter_stays_within_a_fifth() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 0.5), 30);
        assert_eq!(p.backoff(2, 0.5), 60);
        assert_eq!(p.backoff(3, 0.5), 120);
        assert_eq!(p.backoff(30, 0.5), 1800);
        assert_eq!(p.backoff(1, 0.0), 24);
        assert_eq!(p.backoff(1, 0.999_999), 36);
    }
}
