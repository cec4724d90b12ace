//! Any bytes through the multicast decoder: never a panic, and whatever decodes
//! encodes back to bytes that decode to the same message.
#![no_main]

use fleetwave::multicast::wire::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((session, msg)) = decode(data) {
        let mut out = Vec::new();
        encode(&mut out, session, &msg);
        assert_eq!(decode(&out), Ok((session, msg)));
    }
});
