//! Which address belongs to whom, in memory. The durable copy is the state store:
//! every binding is committed there before the client hears of it, and this table is
//! rebuilt from it at start, so a restart never hands one address to two clients.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::spec::{IpRange, Mac};
use crate::state::{Lease, LeaseState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Offered, not yet requested: held briefly and never written down.
    Offered,
    Bound,
    Declined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub mac: Mac,
    /// Unix seconds.
    pub expires: u64,
    pub kind: Kind,
    /// Index of the site in the server's configuration.
    pub site: usize,
}

/// Keyed by what clients send, so with std's DoS-resistant hasher (not FxHash).
#[derive(Debug, Default)]
pub struct Leases {
    by_ip: HashMap<Ipv4Addr, Entry>,
    /// A client's latest address on each site.
    by_client: HashMap<(usize, Mac), Ipv4Addr>,
    /// Where the search for a free address resumes, per site.
    cursor: HashMap<usize, u32>,
}

impl Leases {
    /// From the store's rows; `site_index` maps a site name to its index (rows of
    /// sites no longer served are kept out of the way by being ignored).
    pub fn load(rows: Vec<Lease>, site_index: impl Fn(&str) -> Option<usize>) -> Leases {
        let mut l = Leases::default();
        for row in rows {
            let Some(site) = site_index(&row.site) else {
                continue;
            };
            let kind = match row.state {
                LeaseState::Bound => Kind::Bound,
                LeaseState::Declined => Kind::Declined,
            };
            l.by_ip.insert(
                row.ip,
                Entry {
                    mac: row.mac,
                    expires: row.expires,
                    kind,
                    site,
                },
            );
            if kind == Kind::Bound {
                l.by_client.insert((site, row.mac), row.ip);
            }
        }
        l
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Entry> {
        self.by_ip.get(&ip)
    }

    /// Whether `mac` may have `ip` now: nobody else holds it and it is not declined.
    pub fn free_for(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        match self.by_ip.get(&ip) {
            None => true,
            Some(e) if e.expires <= now => true,
            Some(e) => e.kind != Kind::Declined && e.mac == mac,
        }
    }

    /// The client's previous address on the site, if it still may have it.
    pub fn previous(&self, site: usize, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        let ip = *self.by_client.get(&(site, mac))?;
        self.free_for(ip, mac, now).then_some(ip)
    }

    /// The next address of `pool` nobody holds, searching on from where the last
    /// search stopped.
    pub fn next_free(
        &mut self,
        site: usize,
        pool: IpRange,
        mac: Mac,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let start = u32::from(pool.first);
        let size = u32::from(pool.last).checked_sub(start)?.checked_add(1)?;
        let cursor = self.cursor.get(&site).copied().unwrap_or(0);
        for step in 0..size {
            let offset = (cursor.wrapping_add(step)) % size;
            let ip = Ipv4Addr::from(start + offset);
            if self.free_for(ip, mac, now) {
                self.cursor.insert(site, (offset + 1) % size);
                return Some(ip);
            }
        }
        None
    }

    /// Hold `ip` for `mac` until `until` while the client decides.
    pub fn offer(&mut self, site: usize, ip: Ipv4Addr, mac: Mac, until: u64, now: u64) {
        // An unexpired binding of the same client stays a binding.
        if let Some(e) = self.by_ip.get(&ip)
            && e.kind == Kind::Bound
            && e.mac == mac
            && e.expires > now
        {
            return;
        }
        self.by_ip.insert(
            ip,
            Entry {
                mac,
                expires: until,
                kind: Kind::Offered,
                site,
            },
        );
        self.by_client.insert((site, mac), ip);
    }

    /// Bind `ip` to `mac`; returns the client's previous address on the site if it
    /// had another one, which is now free.
    pub fn bind(&mut self, site: usize, ip: Ipv4Addr, mac: Mac, expires: u64) -> Option<Ipv4Addr> {
        self.by_ip.insert(
            ip,
            Entry {
                mac,
                expires,
                kind: Kind::Bound,
                site,
            },
        );
        let old = self.by_client.insert((site, mac), ip)?;
        if old == ip {
            return None;
        }
        match self.by_ip.get(&old) {
            Some(e) if e.mac == mac && e.kind != Kind::Declined => {
                self.by_ip.remove(&old);
                Some(old)
            }
            _ => None,
        }
    }

    /// Forget `mac`'s hold on `ip`; false if it was not the client's.
    pub fn release(&mut self, ip: Ipv4Addr, mac: Mac) -> bool {
        match self.by_ip.get(&ip) {
            Some(e) if e.mac == mac && e.kind != Kind::Declined => {
                let site = e.site;
                self.by_ip.remove(&ip);
                if self.by_client.get(&(site, mac)) == Some(&ip) {
                    self.by_client.remove(&(site, mac));
                }
                true
            }
            _ => false,
        }
    }

    /// Keep `ip` out of use until `until`: a client found it taken.
    pub fn decline(&mut self, site: usize, ip: Ipv4Addr, mac: Mac, until: u64) {
        self.by_ip.insert(
            ip,
            Entry {
                mac,
                expires: until,
                kind: Kind::Declined,
                site,
            },
        );
        if self.by_client.get(&(site, mac)) == Some(&ip) {
            self.by_client.remove(&(site, mac));
        }
    }

    /// Unexpired bindings, for the health endpoint.
    pub fn bound(&self, now: u64) -> usize {
        self.by_ip
            .values()
            .filter(|e| e.kind == Kind::Bound && e.expires > now)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    fn pool() -> IpRange {
        IpRange {
            first: Ipv4Addr::new(10, 0, 0, 10),
            last: Ipv4Addr::new(10, 0, 0, 12),
        }
    }

    #[test]
    fn a_full_pool_hands_out_nothing_and_expiry_frees_addresses() {
        let mut l = Leases::default();
        for n in 0..3 {
            let ip = l.next_free(0, pool(), mac(n), 0).expect("room");
            l.bind(0, ip, mac(n), 100);
        }
        assert_eq!(l.next_free(0, pool(), mac(9), 50), None);
        assert!(l.next_free(0, pool(), mac(9), 100).is_some());
    }

    #[test]
    fn an_offer_does_not_take_a_binding_from_its_owner() {
        let mut l = Leases::default();
        let ip = Ipv4Addr::new(10, 0, 0, 10);
        l.bind(0, ip, mac(1), 100);
        assert!(!l.free_for(ip, mac(2), 10));
        l.offer(0, ip, mac(1), 20, 10);
        assert_eq!(l.get(ip).map(|e| e.kind), Some(Kind::Bound));
    }

    #[test]
    fn declined_addresses_are_skipped_even_for_the_decliner() {
        let mut l = Leases::default();
        let ip = Ipv4Addr::new(10, 0, 0, 10);
        l.decline(0, ip, mac(1), 100);
        assert!(!l.free_for(ip, mac(1), 10));
        assert_eq!(
            l.next_free(0, pool(), mac(1), 10),
            Some(Ipv4Addr::new(10, 0, 0, 11))
        );
    }
}
