//! The framer never panics, never holds more than its limit, and splits the same
//! input into the same frames however it is chunked.
#![no_main]

use framing::{Frame, Framer};
use libfuzzer_sys::fuzz_target;
use qmpgate_protocol::framing;

const LIMIT: usize = 256;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let mut whole = Framer::new(LIMIT, 8);
    let mut a = Vec::new();
    whole.push(input, &mut a);
    a.extend(whole.finish());

    let mut chunked = Framer::new(LIMIT, 8);
    let mut b = Vec::new();
    let step = usize::from(split).max(1);
    for chunk in input.chunks(step) {
        chunked.push(chunk, &mut b);
    }
    b.extend(chunked.finish());
    assert_eq!(a, b, "chunking changed the frames");
    for frame in &a {
        if let Frame::Message(bytes) = frame {
            assert!(bytes.len() <= LIMIT + 1, "a frame exceeded the limit");
        }
    }
});
