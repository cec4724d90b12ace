//! The TFTP decoder: every datagram on port 69 (requests with their options) and on a
//! transfer's port (ACKs, errors). Nothing a client sends may panic the server.

#![no_main]

use fleetwave::services::tftp::packet::{parse_reply, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data);
    let _ = parse_reply(data);
});
