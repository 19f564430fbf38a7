//! Splitting a QMP byte stream into messages.
//!
//! QMP input is framed by JSON structure, not by lines: `{..}{..}` with no newline is
//! two messages, a message may arrive one byte at a time, and the official Python
//! client sends no newline at all. [`Framer`] scans bytes incrementally, tracking only
//! nesting and string state (it interprets nothing), and yields each complete
//! top-level value.
//!
//! QEMU also accepts single-quoted strings; the framer rewrites them to standard
//! double-quoted JSON so that everything after it can use a strict parser.
//!
//! Limits are enforced while scanning, so memory stays bounded whatever a peer
//! sends: a message over the size limit or nested too deep is skipped to its end
//! (without being stored) and reported as [`Frame::TooLarge`] / [`Frame::TooDeep`].

/// The default limit on one message. QEMU's own limit (64 MiB per token) is far too
/// generous: a 1 MiB message already takes QEMU seconds to parse.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// The default limit on nesting. QEMU allows 1024; no QMP command needs more than a
/// handful of levels (blockdev graphs reach about ten).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// One unit of input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level value, as strict JSON bytes (single quotes rewritten).
    /// It may still be invalid JSON: the framer checks structure, not grammar.
    Message(Vec<u8>),
    /// A message exceeded the size limit; its bytes were discarded.
    TooLarge,
    /// A message exceeded the nesting limit; its bytes were discarded.
    TooDeep,
}

/// Where the scanner is inside the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between values at the top level.
    Idle,
    /// Inside `{...}` or `[...]`, outside any string.
    Structure,
    /// Inside a string opened by this quote character; `escaped` after a backslash.
    String { quote: u8, escaped: bool },
    /// Inside a bare top-level token (a number, `true`, or garbage).
    Bare,
}

/// Why the current message is being discarded rather than stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    No,
    TooLarge,
    TooDeep,
}

/// An incremental, bounded splitter of a JSON byte stream into top-level values.
#[derive(Debug)]
pub struct Framer {
    max_message: usize,
    max_depth: usize,
    lex: Lex,
    /// Open brackets of the current value; the framer does not check that `}` closes
    /// a `{` (the JSON parser does), only that nesting returns to zero.
    depth: usize,
    /// Bytes of the current value, in strict JSON form.
    buf: Vec<u8>,
    skip: Skip,
    /// Whether the string being scanned is a top-level string (a value of its own).
    top_level_string: bool,
    /// A frame completed by a delimiter that also starts the next value.
    pending: Vec<Frame>,
}

impl Framer {
    /// A framer with the given limits on message size (bytes) and nesting depth.
    pub fn new(max_message: usize, max_depth: usize) -> Self {
        Framer {
            max_message,
            max_depth,
            lex: Lex::Idle,
            depth: 0,
            buf: Vec::new(),
            skip: Skip::No,
            top_level_string: false,
            pending: Vec::new(),
        }
    }

    /// Whether a message is partly received (used to tell a clean EOF from a cut one).
    pub fn in_message(&self) -> bool {
        self.lex != Lex::Idle
    }

    /// Feed bytes; complete frames are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            let frame = self.byte(b);
            out.append(&mut self.pending);
            out.extend(frame);
        }
    }

    /// Signal the end of input: a bare token at the very end is complete.
    pub fn finish(&mut self) -> Option<Frame> {
        if self.lex == Lex::Bare {
            return Some(self.complete());
        }
        None
    }

    fn byte(&mut self, b: u8) -> Option<Frame> {
        match self.lex {
            Lex::Idle => match b {
                b' ' | b'\t' | b'\r' | b'\n' => None,
                b'{' | b'[' => {
                    self.lex = Lex::Structure;
                    self.depth = 1;
                    self.store(b);
                    self.check_depth();
                    None
                }
                b'"' | b'\'' => {
                    self.lex = Lex::String {
                        quote: b,
                        escaped: false,
                    };
                    self.top_level_string = true;
                    self.store(b'"');
                    None
                }
                // A stray closing bracket is a value of its own (and a parse error).
                b'}' | b']' => {
                    self.store(b);
                    Some(self.complete())
                }
                _ => {
                    self.lex = Lex::Bare;
                    self.store(b);
                    None
                }
            },
            Lex::Bare => match b {
                b' ' | b'\t' | b'\r' | b'\n' => Some(self.complete()),
                b'{' | b'[' | b'}' | b']' | b'"' | b'\'' => {
                    // The delimiter ends this token and begins the next value.
                    let frame = self.complete();
                    self.pending.push(frame);
                    self.byte(b)
                }
                _ => {
                    self.store(b);
                    None
                }
            },
            Lex::Structure => match b {
                b'{' | b'[' => {
                    self.depth += 1;
                    self.store(b);
                    self.check_depth();
                    None
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    self.store(b);
                    (self.depth == 0).then(|| self.complete())
                }
                b'"' | b'\'' => {
                    self.lex = Lex::String {
                        quote: b,
                        escaped: false,
                    };
                    self.top_level_string = false;
                    self.store(b'"');
                    None
                }
                _ => {
                    self.store(b);
                    None
                }
            },
            Lex::String { quote, escaped } => {
                if escaped {
                    // `\'` is only meaningful in single-quoted strings, and strict JSON
                    // has no such escape: emit the bare quote instead.
                    if b == b'\'' {
                        self.store(b'\'');
                    } else {
                        self.store(b'\\');
                        self.store(b);
                    }
                    self.lex = Lex::String {
                        quote,
                        escaped: false,
                    };
                    return None;
                }
                match b {
                    b'\\' => {
                        self.lex = Lex::String {
                            quote,
                            escaped: true,
                        };
                        None
                    }
                    b if b == quote => {
                        self.store(b'"');
                        if self.top_level_string {
                            Some(self.complete())
                        } else {
                            self.lex = Lex::Structure;
                            None
                        }
                    }
                    b'"' => {
                        // A double quote inside a single-quoted string.
                        self.store(b'\\');
                        self.store(b'"');
                        None
                    }
                    _ => {
                        self.store(b);
                        None
                    }
                }
            }
        }
    }

    fn store(&mut self, b: u8) {
        if self.skip != Skip::No {
            return;
        }
        if self.buf.len() >= self.max_message {
            self.skip = Skip::TooLarge;
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    fn check_depth(&mut self) {
        if self.depth > self.max_depth && self.skip == Skip::No {
            self.skip = Skip::TooDeep;
            self.buf = Vec::new();
        }
    }

    fn complete(&mut self) -> Frame {
        self.lex = Lex::Idle;
        self.depth = 0;
        let frame = match std::mem::replace(&mut self.skip, Skip::No) {
            Skip::No => Frame::Message(std::mem::take(&mut self.buf)),
            Skip::TooLarge => Frame::TooLarge,
            Skip::TooDeep => Frame::TooDeep,
        };
        // Keep the allocation bounded: a huge message should not pin its buffer.
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        frame
    }
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(DEFAULT_MAX_MESSAGE, DEFAULT_MAX_DEPTH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut framer = Framer::default();
        let mut out = Vec::new();
        framer.push(input, &mut out);
        out.extend(framer.finish());
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_back_to_back_objects_without_newlines() {
        assert_eq!(
            frames(br#"{"execute":"a"}{"execute":"b"}"#),
            vec![msg(r#"{"execute":"a"}"#), msg(r#"{"execute":"b"}"#)]
        );
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_frames() {
        let input = br#" {"execute": "x", "arguments": {"a": [1, {"b": "}"}]}} "#;
        let mut framer = Framer::default();
        let mut out = Vec::new();
        for b in input {
            framer.push(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(
            out,
            vec![msg(
                r#"{"execute": "x", "arguments": {"a": [1, {"b": "}"}]}}"#
            )]
        );
    }

    #[test]
    fn brackets_and_quotes_inside_strings_do_not_count() {
        assert_eq!(frames(br#"{"a": "{[\"'"}"#), vec![msg(r#"{"a": "{[\"'"}"#)]);
    }

    #[test]
    fn single_quoted_strings_become_strict_json() {
        assert_eq!(
            frames(br#"{'execute': 'say "hi"', 'x': 'it\'s'}"#),
            vec![msg(r#"{"execute": "say \"hi\"", "x": "it's"}"#)]
        );
    }

    #[test]
    fn bare_tokens_and_stray_brackets_are_their_own_frames() {
        assert_eq!(frames(b"42 true}"), vec![msg("42"), msg("true"), msg("}")]);
        assert_eq!(frames(b"foo{}"), vec![msg("foo"), msg("{}")]);
    }

    #[test]
    fn oversized_message_is_skipped_and_the_next_one_survives() {
        let mut framer = Framer::new(16, 8);
        let mut out = Vec::new();
        let big = format!(r#"{{"execute": "{}"}}{{"id":1}}"#, "a".repeat(100));
        framer.push(big.as_bytes(), &mut out);
        assert_eq!(out, vec![Frame::TooLarge, msg(r#"{"id":1}"#)]);
    }

    #[test]
    fn deep_nesting_is_skipped_and_the_next_one_survives() {
        let mut framer = Framer::new(1 << 20, 4);
        let mut out = Vec::new();
        framer.push(b"[[[[[[]]]]]] {}", &mut out);
        assert_eq!(out, vec![Frame::TooDeep, msg("{}")]);
    }

    #[test]
    fn memory_stays_bounded_for_an_endless_message() {
        let mut framer = Framer::new(1024, 8);
        let mut out = Vec::new();
        framer.push(b"{\"a\": \"", &mut out);
        for _ in 0..1000 {
            framer.push(&[b'x'; 1024], &mut out);
        }
        assert!(out.is_empty());
        assert!(framer.buf.capacity() <= 2048);
        assert!(framer.in_message());
    }
}
