//! Chardev specs from untrusted text (config files, the control monitor) parse or
//! fail with a message; none panics, and a parsed spec always has an id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpgate_protocol::chardev;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for parse in [
        chardev::ChardevSpec::parse,
        chardev::ChardevSpec::parse_runtime,
    ] {
        match parse(text) {
            Ok(spec) => assert!(!spec.id.is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
