//! QEMU's JSON dialect, byte for byte: how QEMU's QMP monitor reads client input
//! (qobject/json-lexer.c, json-streamer.c, json-parser.c) and how it writes replies
//! (qobject/json-writer.c and QDict's key order).
//!
//! Clients are written against QEMU, so a client that sends malformed input must
//! get exactly what QEMU would send: the same error texts, as many error replies,
//! and the next command understood from the same byte on. The reader is therefore
//! QEMU's own design, rewritten: a lexer (a state machine over bytes, with QEMU's
//! recovery after an invalid byte), a streamer (it counts brackets and hands a
//! complete value's tokens to the parser) and a recursive parser whose first error
//! wins. It accepts QEMU's extensions (single-quoted strings, `\'`), decodes strings
//! as QEMU does (modified UTF-8, no noncharacters or surrogates) and refuses
//! duplicate keys, so that a policy never judges one reading while QEMU sees
//! another.
//!
//! qmpgate's own limits come first: a message over `max_message` bytes or nested
//! deeper than `max_depth` gets one error ([`Input::TooLarge`], [`Input::TooDeep`])
//! and the rest of it is skipped, token by token, so memory stays bounded. QEMU's
//! own limits (64 MiB, 1024 levels) are far above them.
//!
//! The writer ([`write()`]) prints values as QEMU does: `{"a": 1, "b": [2, 3]}`,
//! every non-ASCII or control character as `\uXXXX`, doubles as `%.17g`, and an
//! object's keys in the order of QEMU's hash table (QDict iterates its 512
//! buckets in order), which is why QEMU writes `{"id": 1, "error": ...}` but
//! `{"return": {}, "id": 1}`.
//!
//! Layout: `lex` (json-lexer.c's state machine), `read` ([`Reader`]: the streamer
//! and qmpgate's limits), `parse` (json-parser.c and QEMU's string decoding),
//! `write` ([`write()`], [`write_object`] and QDict's key order).

use serde_json::Value;

mod lex;
mod parse;
mod read;
#[cfg(test)]
mod tests;
mod write;

pub use read::Reader;
pub use write::{qdict_bucket, qdict_order, write, write_object};

/// One unit of client input, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A complete, valid JSON value.
    Value(Value),
    /// What QEMU would answer for invalid input (`JSON parse error, ...`), without id.
    Error(String),
    /// A message exceeded qmpgate's size limit; the rest of it is skipped.
    TooLarge,
    /// A message exceeded qmpgate's nesting limit; the rest of it is skipped.
    TooDeep,
}
