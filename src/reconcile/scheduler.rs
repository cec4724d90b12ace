//! The per-host work queue: each host at most once, at its earliest deadline.
//!
//! A request for a host already queued keeps the earlier of the two times, so a burst
//! of observations about one host costs one reconcile. The controller runs one
//! reconcile at a time, so no host is ever reconciled twice at once.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Default)]
pub struct Scheduler {
    /// Host → its deadline (Unix milliseconds).
    due: HashMap<String, u64>,
    /// (deadline, host), for the earliest.
    order: BTreeSet<(u64, String)>,
}

impl Scheduler {
    /// Queue `host` for `at` (Unix ms), unless it is queued earlier already.
    pub fn schedule(&mut self, host: &str, at: u64) {
        match self.due.get(host) {
            Some(&old) if old <= at => {}
            Some(&old) => {
                self.order.remove(&(old, host.to_string()));
                self.order.insert((at, host.to_string()));
                self.due.insert(host.to_string(), at);
            }
            None => {
                self.order.insert((at, host.to_string()));
                self.due.insert(host.to_string(), at);
            }
        }
    }

    /// Forget `host` (it left the fleet).
    pub fn cancel(&mut self, host: &str) {
        if let Some(at) = self.due.remove(host) {
            self.order.remove(&(at, host.to_string()));
        }
    }

    /// The earliest deadline, if any host is queued.
    pub fn next(&self) -> Option<u64> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Every host due at `now` (Unix ms), earliest first; they leave the queue.
    pub fn pop_due(&mut self, now: u64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.order.first() {
            if *at > now {
                break;
            }
            if let Some((_, host)) = self.order.pop_first() {
                self.due.remove(&host);
                out.push(host);
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_dedupe_should_keep_the_earlier_deadline() {
        let mut s = Scheduler::default();
        s.schedule("pc01", 500);
        s.schedule("pc01", 900);
        s.schedule("pc01", 200);
        assert_eq!(s.len(), 1);
        assert_eq!(s.next(), Some(200));
        assert!(s.pop_due(199).is_empty());
        assert_eq!(s.pop_due(200), vec!["pc01"]);
        assert!(s.is_empty());
    }

    #[test]
    fn scheduler_should_hand_out_due_hosts_earliest_first_and_keep_the_rest() {
        let mut s = Scheduler::default();
        s.schedule("b", 30);
        s.schedule("a", 10);
        s.schedule("c", 99);
        assert_eq!(s.pop_due(50), vec!["a", "b"]);
        assert_eq!(s.next(), Some(99));
        s.cancel("c");
        assert_eq!(s.next(), None);
    }
}
