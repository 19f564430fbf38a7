//! Every message the reader yields becomes a request or a QMP error; none panics,
//! every error is written as QEMU writes it, and an error without an id is only
//! ever a parse error or a non-object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpgate_protocol::{qjson, qmp};

fuzz_target!(|data: &[u8]| {
    let mut reader = qjson::Reader::new(1 << 16, 32);
    let mut inputs = Vec::new();
    reader.push(data, &mut inputs);
    for input in inputs {
        match input {
            qjson::Input::Value(value) => {
                for oob in [false, true] {
                    if let Err(e) = qmp::parse_request(value.clone(), oob) {
                        assert!(!e.error.desc.is_empty());
                        let bytes = qmp::encode(&qmp::error_response(&e.error, e.id));
                        assert!(bytes.is_ascii(), "QEMU's writer escapes all but ASCII");
                    }
                }
                let _ = qmp::parse_qemu_message(&qmp::encode(&value));
            }
            qjson::Input::Error(desc) => assert!(desc.starts_with("JSON parse error, ")),
            qjson::Input::TooLarge | qjson::Input::TooDeep => {}
        }
    }
});
