//! The QMP reader never panics, gives the same answers however its input is
//! chunked, and what it reads, written back, reads as the same value (a double
//! may come back as an integer: QEMU prints 200.0 as `200` and -0.0 as `-0` too).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qjson::{Input, Reader};
use qmpgate_protocol::qjson;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let mut whole = Reader::new(256, 8);
    let mut a = Vec::new();
    whole.push(input, &mut a);

    let mut chunked = Reader::new(256, 8);
    let mut b = Vec::new();
    for chunk in input.chunks(usize::from(split).max(1)) {
        chunked.push(chunk, &mut b);
    }
    assert_eq!(a, b, "chunking changed what was read");

    for value in a.iter().filter_map(|i| match i {
        Input::Value(v) => Some(v),
        _ => None,
    }) {
        let mut bytes = Vec::new();
        qjson::write(value, &mut bytes);
        bytes.push(b' ');
        let mut again = Reader::new(1 << 20, 64);
        let mut out = Vec::new();
        again.push(&bytes, &mut out);
        let [Input::Value(reread)] = out.as_slice() else {
            panic!("what qjson wrote does not read back: {out:?}");
        };
        assert!(
            same(value, reread),
            "write then read changed {value} into {reread}"
        );
    }
});

/// Equal, numbers compared by value whatever their kind.
fn same(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
        (Object(x), Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}
