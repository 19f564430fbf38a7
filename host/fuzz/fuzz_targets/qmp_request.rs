//! Every framed message parses into a request or a QMP error; none panics, and an
//! error without an id is only ever a parse error (a duplicate key among them) or a
//! non-object.
#![no_main]

#[path = "../../src/framing.rs"]
#[allow(dead_code)]
mod framing;
#[path = "../../src/json_keys.rs"]
#[allow(dead_code)]
mod json_keys;
#[path = "../../src/qmp.rs"]
#[allow(dead_code)]
mod qmp;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut framer = framing::Framer::new(1 << 16, 32);
    let mut frames = Vec::new();
    framer.push(data, &mut frames);
    for frame in frames {
        if let framing::Frame::Message(bytes) = frame {
            for oob in [false, true] {
                if let Err(e) = qmp::parse_request(&bytes, oob) {
                    assert!(!e.error.desc.is_empty());
                    let _ = qmp::encode(&qmp::error_response(&e.error, e.id));
                }
            }
            let _ = qmp::parse_upstream(&bytes);
        }
    }
});
