//! Stream framing, driven the way a stream reader drives it: start with nothing, give `frame` what it
//! asks for, and check that it never asks for fewer bytes than it already has, that `Complete` lies
//! within what it was given, and that a decodable framed packet ends exactly where framing said.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenso_format::{decode_prefix, frame, Body, DecodeOptions, Frame, Packet};

fuzz_target!(|data: &[u8]| {
    let opts = DecodeOptions::default();
    let mut have = 0usize;
    loop {
        match frame(&data[..have], &opts) {
            Ok(Frame::Need(n)) => {
                assert!(n > have, "asked for {n} bytes with {have} in hand");
                if n > data.len() {
                    // `n` bytes are proven necessary, so the whole (shorter) input cannot be complete.
                    assert!(
                        !matches!(frame(data, &opts), Ok(Frame::Complete(_))),
                        "need {n} but {} frames",
                        data.len()
                    );
                    return;
                }
                have = n;
            }
            Ok(Frame::Complete(n)) => {
                assert!(n <= have, "complete at {n} with only {have} bytes");
                if let Ok((p, end)) = decode_prefix(&data[..n], &opts) {
                    let compressed =
                        matches!(&p, Packet::Dense(d) if !matches!(d.body, Body::Raw(_)));
                    assert!(
                        compressed || end == n,
                        "decoded end {end} != framed end {n}"
                    );
                }
                return;
            }
            Err(_) => return,
        }
    }
});
