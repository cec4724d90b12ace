//! Small value types of the fleet model and their parsers. Each parser returns a
//! message that says what was expected, for the validator to place and print.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A MAC address, printed lower-case with colons.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// The display form, so that logs (`mac = ?x`) and `{:?}` of structs holding one read
/// as an address, not as six numbers.
impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid MAC address `{s}`: expected six hex pairs like 52:54:00:28:00:11");
        // Byte by byte: a 100,000-host fleet parses this 100,000 times.
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(bad());
        }
        let sep = b[2];
        if sep != b':' && sep != b'-' {
            return Err(bad());
        }
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 6];
        for (i, o) in out.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && b[at - 1] != sep {
                return Err(bad());
            }
            match (hex(b[at]), hex(b[at + 1])) {
                (Some(h), Some(l)) => *o = h << 4 | l,
                _ => return Err(bad()),
            }
        }
        if out[0] & 1 == 1 {
            return Err(format!(
                "invalid MAC address `{s}`: it is a multicast address, no NIC has it"
            ));
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a MAC address like 52:54:00:28:00:11")
    }
}

/// Deserialize a value written as a string through its `FromStr`, borrowing the text
/// instead of building a `String`: observed states list 100,000 MACs and digests.
fn parse_str<'de, D, T>(d: D, what: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String>,
{
    struct V<T>(&'static str, std::marker::PhantomData<T>);
    impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            s.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(what, std::marker::PhantomData))
}

/// Parse "1h", "30m", "45s", "2d", "1h30m" into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid duration `{s}`: expected a number with a unit, like 30s, 10m, 1h or 1h30m")
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return Err(bad()),
        };
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    Ok(total)
}

/// Parse a rate into bits per second: "900Mbit", "1Gbit", "1gbps", "100MB/s", "50MiB/s".
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("invalid rate `{s}`: expected a number and a unit, like 900Mbit, 1Gbit or 100MB/s")
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let mult: f64 = match unit {
        "bit" | "bps" | "bit/s" => 1.0,
        "kbit" | "Kbit" | "kbps" | "Kbps" | "kbit/s" => 1e3,
        "Mbit" | "mbit" | "Mbps" | "mbps" | "Mbit/s" => 1e6,
        "Gbit" | "gbit" | "Gbps" | "gbps" | "Gbit/s" => 1e9,
        "B/s" => 8.0,
        "kB/s" | "KB/s" => 8e3,
        "MB/s" => 8e6,
        "GB/s" => 8e9,
        "KiB/s" => 8.0 * 1024.0,
        "MiB/s" => 8.0 * 1024.0 * 1024.0,
        "GiB/s" => 8.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v = n * mult;
    if !(v.is_finite() && v >= 1.0) {
        return Err(bad());
    }
    Ok(v as u64)
}

/// A byte size: "256G", "512GiB", "2T", "1000000".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size `{s}`: expected a number and a unit, like 256G or 512GiB");
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KB" | "k" | "kB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let v = n * mult;
    if !v.is_finite() || v < 1.0 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// A range of disk sizes in bytes, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SizeRange {
    pub min: u64,
    pub max: u64,
}

impl FromStr for SizeRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let r = if let Some(v) = t.strip_prefix(">=") {
            SizeRange {
                min: parse_size(v)?,
                max: u64::MAX,
            }
        } else if let Some(v) = t.strip_prefix("<=") {
            SizeRange {
                min: 0,
                max: parse_size(v)?,
            }
        } else if let Some(v) = t.strip_prefix('>') {
            SizeRange {
                min: parse_size(v)?.saturating_add(1),
                max: u64::MAX,
            }
        } else if let Some(v) = t.strip_prefix('<') {
            SizeRange {
                min: 0,
                max: parse_size(v)?.saturating_sub(1),
            }
        } else if let Some((a, b)) = t.split_once('-') {
            SizeRange {
                min: parse_size(a)?,
                max: parse_size(b)?,
            }
        } else {
            // Vendors round: a "256G" disk is rarely exactly 256e9 bytes.
            let n = parse_size(t)?;
            SizeRange {
                min: n - n / 20,
                max: n + n / 20,
            }
        };
        if r.min > r.max {
            return Err(format!(
                "invalid size range `{s}`: the lower bound is above the upper"
            ));
        }
        Ok(r)
    }
}

/// An inclusive range of IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IpRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl IpRange {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.first <= ip && ip <= self.last
    }
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last)) - u64::from(u32::from(self.first)) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for IpRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid pool `{s}`: expected first-last, like 172.28.0.100-172.28.0.199");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let last: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(format!("invalid pool `{s}`: {first} comes after {last}"));
        }
        Ok(IpRange { first, last })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// An image version's name: the BLAKE3 hash of its manifest, written
/// `blake3:<64 hex digits>`. Held as the 32 bytes: plans copy it for every host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// The display form: `Digest([30, 93, ...])` in a log line helps nobody.
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Digest {
    /// The first 12 hex digits, as people read them.
    pub fn short(&self) -> String {
        String::from_utf8_lossy(&self.hex()[..12]).into_owned()
    }

    fn hex(&self) -> [u8; 64] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        out
    }
}

impl FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid image digest `{s}`: expected blake3: followed by 64 hex digits");
        let hex = s.strip_prefix("blake3:").unwrap_or(s).as_bytes();
        if hex.len() != 64 {
            return Err(bad());
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => *o = h << 4 | l,
                _ => return Err(bad()),
            }
        }
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("blake3:")?;
        f.write_str(&String::from_utf8_lossy(&self.hex()))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "an image digest like blake3:<64 hex digits>")
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WEEK: u32 = 7 * 24 * 60;

/// A recurring maintenance window, as minutes of the week (Monday 00:00 = 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// As written, for people.
    pub text: String,
    /// Half-open `[start, end)` intervals; an interval may wrap past Sunday midnight
    /// (end < start).
    #[serde(skip)]
    pub intervals: Vec<(u32, u32)>,
}

impl Window {
    /// Whether the minute of the week (0 = Monday 00:00) is inside the window.
    pub fn contains(&self, minute_of_week: u32) -> bool {
        let m = minute_of_week % WEEK;
        self.intervals.iter().any(|&(s, e)| {
            if s < e {
                s <= m && m < e
            } else {
                m >= s || m < e
            }
        })
    }
}

fn parse_day(s: &str) -> Option<u32> {
    let l = s.to_ascii_lowercase();
    if l.len() < 3 {
        return None;
    }
    DAYS.iter()
        .position(|d| l.starts_with(d) && full_day(d).starts_with(&l))
        .map(|i| i as u32)
}

fn full_day(d: &str) -> &'static str {
    match d {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    // 24:00 is the end of the day.
    if (h < 24 && m < 60) || (h == 24 && m == 0) {
        Some(h * 60 + m)
    } else {
        None
    }
}

/// Days named by "Mon", "Mon-Fri", "Sat,Sun", "daily".
fn parse_days(s: &str) -> Option<Vec<u32>> {
    if s.eq_ignore_ascii_case("daily") {
        return Some((0..7).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (parse_day(a)?, parse_day(b)?);
            let mut d = a;
            loop {
                out.push(d);
                if d == b {
                    break;
                }
                d = (d + 1) % 7;
            }
        } else {
            out.push(parse_day(part)?);
        }
    }
    Some(out)
}

impl FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid maintenance window `{s}`: expected `DAY HH:MM - DAY HH:MM` (Sat 22:00 - Sun 06:00), `DAYS HH:MM - HH:MM` (Mon-Fri 19:00 - 23:00) or `daily HH:MM - HH:MM`"
            )
        };
        let (from, to) = s.split_once(" - ").ok_or_else(bad)?;
        let from: Vec<&str> = from.split_whitespace().collect();
        let to: Vec<&str> = to.split_whitespace().collect();
        let mut intervals = Vec::new();
        match (from.as_slice(), to.as_slice()) {
            // "Sat 22:00 - Sun 06:00": one span across days.
            ([d1, t1], [d2, t2]) => {
                let (d1, d2) = (
                    parse_day(d1).ok_or_else(bad)?,
                    parse_day(d2).ok_or_else(bad)?,
                );
                let (t1, t2) = (
                    parse_hhmm(t1).ok_or_else(bad)?,
                    parse_hhmm(t2).ok_or_else(bad)?,
                );
                let start = d1 * 1440 + t1;
                let end = (d2 * 1440 + t2) % WEEK;
                if start == end {
                    return Err(format!("invalid maintenance window `{s}`: it is empty"));
                }
                intervals.push((start, end));
            }
            // "Mon-Fri 19:00 - 23:00", "daily 22:00 - 06:00", "22:00 - 06:00".
            (days_and_time, [t2]) if days_and_time.len() <= 2 && !days_and_time.is_empty() => {
                let (days, t1) = match days_and_time {
                    [t1] => ((0..7).collect(), *t1),
                    [d, t1] => (parse_days(d).ok_or_else(bad)?, *t1),
                    _ => return Err(bad()),
                };
                let (t1, t2) = (
                    parse_hhmm(t1).ok_or_else(bad)?,
                    parse_hhmm(t2).ok_or_else(bad)?,
                );
                if t1 == t2 {
                    return Err(format!("invalid maintenance window `{s}`: it is empty"));
                }
                for d in days {
                    let start = d * 1440 + t1;
                    // An end before the start runs past midnight into the next day.
                    let end = if t2 > t1 {
                        d * 1440 + t2
                    } else {
                        (d + 1) * 1440 + t2
                    };
                    intervals.push((start, end % WEEK));
                }
            }
            _ => return Err(bad()),
        }
        Ok(Window {
            text: s.to_string(),
            intervals,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logs write fields with `?`: what they show must be what people read elsewhere.
    #[test]
    fn digests_and_macs_debug_print_as_displayed() {
        let d = Digest([0xab; 32]);
        let m: Mac = "52:54:00:28:00:11".parse().expect("mac");
        assert_eq!(format!("{:?}", Some(d)), format!("Some({d})"));
        assert!(format!("{d:?}").starts_with("blake3:abab"));
        assert_eq!(format!("{m:?}"), "52:54:00:28:00:11");
    }

    #[test]
    fn weekend_window_wraps_into_sunday() {
        let w: Window = "Sat 22:00 - Sun 06:00".parse().unwrap();
        let sat_23 = 5 * 1440 + 23 * 60;
        let sun_05 = 6 * 1440 + 5 * 60;
        let sun_07 = 6 * 1440 + 7 * 60;
        assert!(w.contains(sat_23) && w.contains(sun_05) && !w.contains(sun_07));
    }

    #[test]
    fn sunday_night_window_wraps_into_monday() {
        let w: Window = "Sun 22:00 - Mon 02:00".parse().unwrap();
        assert!(w.contains(6 * 1440 + 23 * 60) && w.contains(60) && !w.contains(3 * 60));
    }

    #[test]
    fn weekday_evening_window() {
        let w: Window = "Mon-Fri 19:00 - 23:00".parse().unwrap();
        assert!(w.contains(4 * 1440 + 20 * 60));
        assert!(!w.contains(5 * 1440 + 20 * 60));
    }

    #[test]
    fn daily_window_past_midnight() {
        let w: Window = "daily 22:00 - 06:00".parse().unwrap();
        assert!(w.contains(2 * 1440 + 3 * 60) && !w.contains(2 * 1440 + 12 * 60));
    }

    #[test]
    fn garbage_windows_are_refused() {
        for s in [
            "Sat 25:00 - Sun 06:00",
            "Caturday 22:00 - Sun 06:00",
            "22:00-06:00",
            "Mon 10:00 - Mon 10:00",
        ] {
            assert!(s.parse::<Window>().is_err(), "{s}");
        }
    }

    #[test]
    fn macs_normalise_and_reject_junk() {
        assert_eq!(
            "52-54-00-AB-00-11".parse::<Mac>().unwrap().to_string(),
            "52:54:00:ab:00:11"
        );
        for s in [
            "52:54:00:28:00",
            "52:54:00:28:00:1g",
            "01:00:5e:00:00:01",
            "525400280011",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s}");
        }
    }

    #[test]
    fn rates_durations_sizes() {
        assert_eq!(parse_rate("900Mbit").unwrap(), 900_000_000);
        assert_eq!(parse_rate("100MB/s").unwrap(), 800_000_000);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert!(parse_duration("10").is_err());
        let r: SizeRange = ">=200G".parse().unwrap();
        assert_eq!(r.min, 200_000_000_000);
        let r: SizeRange = "256G".parse().unwrap();
        assert!(r.min < 256_000_000_000 && r.max > 256_060_514_304);
    }
}
