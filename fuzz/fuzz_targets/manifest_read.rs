//! The manifest reader: a version's JSON as the store and the agent read it (from a
//! capture's upload, or from disk), then what a deploy computes from it before it
//! writes: where each chunk goes, the bytes used, the canonical bytes and digest.

#![no_main]

use fleetwave::image::manifest::Manifest;
use fleetwave::image::placements;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    // Whether or not it is consistent, nothing computed from it may panic.
    let _ = m.check();
    let _ = m.used_bytes();
    let places = placements(&m);
    assert_eq!(places.len(), m.chunks.len());
    let bytes = m.to_bytes();
    let _ = Manifest::digest_of(&bytes);
    // The canonical form reads back as the same manifest.
    let again: Manifest = serde_json::from_slice(&bytes).expect("canonical bytes parse");
    assert_eq!(again, m);
});
