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
//! The writer ([`write`]) prints values as QEMU does: `{"a": 1, "b": [2, 3]}`,
//! every non-ASCII or control character as `\uXXXX`, doubles as `%.17g`, and an
//! object's keys in the order of QEMU's hash table (QDict iterates its 512
//! buckets in order), which is why QEMU writes `{"id": 1, "error": ...}` but
//! `{"return": {}, "id": 1}`.

use serde_json::{Map, Number, Value};

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

/// Lexer states (json-lexer.c's `IN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// After an invalid byte: skip to a byte where input can sensibly resume.
    Recovery,
    Dq,
    DqEscape,
    Sq,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// Token types the lexer hands to the streamer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// What the lexer does with one byte in one state.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Consume the byte and go to this state.
    Go(State),
    /// The token is complete; `lookahead` leaves the byte for the next token.
    Emit(Kind, bool),
    /// The byte cannot continue or start a token (it is consumed).
    Error,
    /// Leave recovery without consuming the byte.
    Resume,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    use Step::{Emit, Error, Go, Resume};
    match state {
        Recovery => match b {
            // Structural characters, control characters but tab, and bytes that
            // never occur in UTF-8 are where input resumes (QEMU's qmp-spec tells
            // clients to send 0xFF to reset the parser).
            b'\t' => Go(Recovery),
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => Resume,
            _ => Go(Recovery),
        },
        Dq | Sq => match b {
            b'\\' if state == Dq => Go(DqEscape),
            b'\\' => Go(SqEscape),
            b'"' if state == Dq => Emit(Kind::String, false),
            b'\'' if state == Sq => Emit(Kind::String, false),
            0x20..=0xFD => Go(state),
            _ => Error,
        },
        // Any non-control byte may follow a backslash; the parser judges it.
        DqEscape => match b {
            0x20..=0xFD => Go(Dq),
            _ => Error,
        },
        SqEscape => match b {
            0x20..=0xFD => Go(Sq),
            _ => Error,
        },
        Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Go(Mantissa),
            _ => Emit(Kind::Integer, true),
        },
        Sign => match b {
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            _ => Error,
        },
        Digits => match b {
            b'0'..=b'9' => Go(Digits),
            b'e' | b'E' => Go(ExpE),
            b'.' => Go(Mantissa),
            _ => Emit(Kind::Integer, true),
        },
        Mantissa => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            _ => Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            b'e' | b'E' => Go(ExpE),
            _ => Emit(Kind::Float, true),
        },
        ExpE => match b {
            b'-' | b'+' => Go(ExpSign),
            b'0'..=b'9' => Go(ExpDigits),
            _ => Error,
        },
        ExpSign => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => Error,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => Emit(Kind::Float, true),
        },
        Keyword => match b {
            b'a'..=b'z' => Go(Keyword),
            _ => Emit(Kind::Keyword, true),
        },
        Start => match b {
            b'"' => Go(Dq),
            b'\'' => Go(Sq),
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            b'-' => Go(Sign),
            b'{' => Emit(Kind::LCurly, false),
            b'}' => Emit(Kind::RCurly, false),
            b'[' => Emit(Kind::LSquare, false),
            b']' => Emit(Kind::RSquare, false),
            b',' => Emit(Kind::Comma, false),
            b':' => Emit(Kind::Colon, false),
            b'a'..=b'z' => Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Go(Start),
            _ => Error,
        },
    }
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    text: Vec<u8>,
}

/// An incremental reader of a client's byte stream, as QEMU's QMP monitor reads
/// it. Memory stays within about `max_message` bytes whatever the client sends.
#[derive(Debug)]
pub struct Reader {
    max_message: usize,
    max_depth: usize,
    state: State,
    /// The token being lexed.
    token: Vec<u8>,
    /// Tokens of the value being collected.
    tokens: Vec<Token>,
    /// Bytes of `tokens`.
    size: usize,
    brace: i64,
    bracket: i64,
    /// Skipping the rest of a message that broke a limit (its error was given).
    skipping: bool,
    /// The size in bytes of each value the latest [`Reader::push`] completed, in
    /// order (its tokens, without the whitespace between them): what holding the
    /// message costs its reader.
    sizes: Vec<usize>,
}

impl Reader {
    /// A reader with limits on one message's size (bytes) and nesting.
    pub fn new(max_message: usize, max_depth: usize) -> Self {
        Reader {
            max_message,
            max_depth,
            state: State::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            size: 0,
            brace: 0,
            bracket: 0,
            skipping: false,
            sizes: Vec::new(),
        }
    }

    /// The sizes of the values the latest [`Reader::push`] completed, in order
    /// (one per [`Input::Value`] it appended).
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Whether a message is partly received (to tell a clean end of input from a
    /// cut one).
    pub fn in_message(&self) -> bool {
        !self.tokens.is_empty()
            || self.skipping
            || !matches!(self.state, State::Start | State::Recovery)
    }

    /// Feeds bytes; what they complete is appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Input>) {
        self.sizes.clear();
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Input>) {
        loop {
            match step(self.state, b) {
                Step::Go(state) => {
                    if state != State::Start && state != State::Recovery {
                        self.keep(b, out);
                    }
                    self.state = state;
                    return;
                }
                Step::Emit(kind, lookahead) => {
                    if !lookahead {
                        self.keep(b, out);
                    }
                    let text = std::mem::take(&mut self.token);
                    self.state = State::Start;
                    self.token_done(kind, text, out);
                    if !lookahead {
                        return;
                    }
                }
                Step::Error => {
                    self.keep(b, out);
                    let text = std::mem::take(&mut self.token);
                    self.state = State::Recovery;
                    // QEMU prints the token as a C string: up to its first NUL.
                    let shown = text.split(|&c| c == 0).next().unwrap_or_default();
                    out.push(Input::Error(format!(
                        "JSON parse error, stray '{}'",
                        sanitize(shown)
                    )));
                    self.reset();
                    return;
                }
                Step::Resume => self.state = State::Start,
            }
        }
    }

    /// Appends a byte to the token being lexed, within the message limit.
    fn keep(&mut self, b: u8, out: &mut Vec<Input>) {
        if self.skipping {
            // The token is not kept; a little of it is, for a `stray` message.
            if self.token.len() < 64 {
                self.token.push(b);
            }
            return;
        }
        if self.size + self.token.len() >= self.max_message {
            self.over_limit(Input::TooLarge, out);
            return;
        }
        self.token.push(b);
    }

    fn token_done(&mut self, kind: Kind, text: Vec<u8>, out: &mut Vec<Input>) {
        match kind {
            Kind::LCurly => self.brace += 1,
            Kind::RCurly => self.brace -= 1,
            Kind::LSquare => self.bracket += 1,
            Kind::RSquare => self.bracket -= 1,
            _ => {}
        }
        let open = (self.brace > 0 || self.bracket > 0) && self.brace >= 0 && self.bracket >= 0;
        if self.skipping {
            if !open {
                self.reset();
            }
            return;
        }
        if self.brace + self.bracket > self.max_depth as i64 {
            self.over_limit(Input::TooDeep, out);
            if !open {
                self.reset();
            }
            return;
        }
        self.size += text.len();
        self.tokens.push(Token { kind, text });
        if open {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        out.push(match parse(&tokens) {
            Ok(value) => {
                self.sizes.push(self.size);
                Input::Value(value)
            }
            Err(desc) => Input::Error(desc),
        });
        self.reset();
    }

    /// Reports a broken limit once and skips the rest of the message.
    fn over_limit(&mut self, why: Input, out: &mut Vec<Input>) {
        out.push(why);
        self.skipping = true;
        self.tokens = Vec::new();
        self.token = Vec::new();
        self.size = 0;
    }

    fn reset(&mut self) {
        self.brace = 0;
        self.bracket = 0;
        self.size = 0;
        self.skipping = false;
        if self.tokens.capacity() > 1024 {
            self.tokens = Vec::new();
        } else {
            self.tokens.clear();
        }
        if self.token.capacity() > 64 * 1024 {
            self.token = Vec::new();
        }
    }
}

/// json-parser.c: one value from a complete token list; the first error wins.
fn parse(tokens: &[Token]) -> Result<Value, String> {
    let mut parser = Parser {
        tokens,
        next: 0,
        error: None,
    };
    match (parser.value(), parser.error) {
        (_, Some(error)) => Err(error),
        (Some(value), None) => Ok(value),
        (None, None) => Err("JSON parse error, expecting value".into()),
    }
}

struct Parser<'a> {
    tokens: &'a [Token],
    next: usize,
    error: Option<String>,
}

impl Parser<'_> {
    fn fail(&mut self, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(format!("JSON parse error, {}", message.into()));
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next)
    }

    fn pop(&mut self) -> Option<Kind> {
        let token = self.tokens.get(self.next)?;
        self.next += 1;
        Some(token.kind)
    }

    fn value(&mut self) -> Option<Value> {
        let Some(token) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        match token.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::Integer | Kind::Float | Kind::String => self.literal(),
            Kind::Keyword => self.keyword(),
            _ => {
                // The token stays: the caller reports on it too (first error wins).
                self.fail("expecting value");
                None
            }
        }
    }

    fn pair(&mut self, object: &mut Map<String, Value>) -> Option<()> {
        if self.peek().is_none() {
            self.fail("premature EOI");
            return None;
        }
        let key = match self.value() {
            Some(Value::String(key)) => key,
            _ => {
                self.fail("key is not a string in object");
                return None;
            }
        };
        match self.pop() {
            None => {
                self.fail("premature EOI");
                return None;
            }
            Some(Kind::Colon) => {}
            Some(_) => {
                self.fail("missing : in object pair");
                return None;
            }
        }
        let Some(value) = self.value() else {
            self.fail("Missing value in dict");
            return None;
        };
        if object.contains_key(&key) {
            self.fail("duplicate key");
            return None;
        }
        object.insert(key, value);
        Some(())
    }

    fn object(&mut self) -> Option<Value> {
        self.pop(); // `{`
        let mut object = Map::new();
        let Some(peek) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        if peek.kind == Kind::RCurly {
            self.pop();
            return Some(Value::Object(object));
        }
        self.pair(&mut object)?;
        loop {
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Kind::RCurly) => return Some(Value::Object(object)),
                Some(Kind::Comma) => self.pair(&mut object)?,
                Some(_) => {
                    self.fail("expected separator in dict");
                    return None;
                }
            }
        }
    }

    fn array(&mut self) -> Option<Value> {
        self.pop(); // `[`
        let mut list = Vec::new();
        let Some(peek) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        if peek.kind == Kind::RSquare {
            self.pop();
            return Some(Value::Array(list));
        }
        let Some(first) = self.value() else {
            self.fail("expecting value");
            return None;
        };
        list.push(first);
        loop {
            match self.pop() {
                None => {
                    self.fail("premature EOI");
                    return None;
                }
                Some(Kind::RSquare) => return Some(Value::Array(list)),
                Some(Kind::Comma) => {
                    let Some(item) = self.value() else {
                        self.fail("expecting value");
                        return None;
                    };
                    list.push(item);
                }
                Some(_) => {
                    self.fail("expected separator in list");
                    return None;
                }
            }
        }
    }

    fn keyword(&mut self) -> Option<Value> {
        let text = &self.tokens[self.next].text;
        self.next += 1;
        match text.as_slice() {
            b"true" => Some(Value::Bool(true)),
            b"false" => Some(Value::Bool(false)),
            b"null" => Some(Value::Null),
            other => {
                let message = format!("invalid keyword '{}'", String::from_utf8_lossy(other));
                self.fail(message);
                None
            }
        }
    }

    fn literal(&mut self) -> Option<Value> {
        let token = &self.tokens[self.next];
        self.next += 1;
        match token.kind {
            Kind::String => match string(&token.text) {
                Ok(text) => Some(Value::String(text)),
                Err(message) => {
                    self.fail(message);
                    None
                }
            },
            kind => {
                // The lexer admits only ASCII digits, signs, `.` and `e` here.
                let text = std::str::from_utf8(&token.text).unwrap_or("0");
                // QEMU: a signed 64-bit integer if it fits, else unsigned, else a
                // double (as strtod reads it).
                if kind == Kind::Integer {
                    if let Ok(n) = text.parse::<i64>() {
                        return Some(Value::from(n));
                    }
                    if let Ok(n) = text.parse::<u64>() {
                        return Some(Value::from(n));
                    }
                }
                let double: f64 = text.parse().unwrap_or(f64::NAN);
                match Number::from_f64(double) {
                    Some(n) => Some(Value::Number(n)),
                    None => {
                        // QEMU would hold an infinity, which it cannot print back
                        // as JSON; qmpgate refuses the number instead.
                        self.fail(format!("number '{text}' is out of range"));
                        None
                    }
                }
            }
        }
    }
}

/// json-parser.c's `parse_string`: a string token's text (quotes included) as
/// QEMU decodes it, or QEMU's error message.
fn string(token: &[u8]) -> Result<String, String> {
    let quote = token[0];
    let mut out = String::new();
    let mut i = 1;
    while token.get(i) != Some(&quote) {
        if i >= token.len() {
            // Unreachable for lexer output: a string token ends with its quote.
            return Err("invalid UTF-8 sequence in string".into());
        }
        if token[i] == b'\\' {
            let start = i;
            i += 1;
            let escape = token.get(i).copied().unwrap_or(0);
            i += 1;
            let c = match escape {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let mut cp = hex4(&token[i..]);
                    i += 4;
                    if (0xD800..=0xDBFF).contains(&cp)
                        && token.get(i) == Some(&b'\\')
                        && token.get(i + 1) == Some(&b'u')
                    {
                        let trailing = hex4(token.get(i + 2..).unwrap_or_default());
                        if (0xDC00..=0xDFFF).contains(&trailing) {
                            cp = (0x10000 + ((cp & 0x3FF) << 10)) | (trailing & 0x3FF);
                            i += 6;
                        } else {
                            cp = -1;
                        }
                    }
                    match valid_codepoint(cp) {
                        Some(c) => c,
                        None => {
                            // QEMU prints the escape as far as it read it (a C
                            // string: the token's end stops it).
                            let shown = &token[start..i.min(token.len())];
                            return Err(format!(
                                "{} is not a valid Unicode character",
                                sanitize(shown)
                            ));
                        }
                    }
                }
                _ => return Err("invalid escape sequence in string".into()),
            };
            out.push(c);
            continue;
        }
        let (cp, len) = mod_utf8_codepoint(&token[i..]);
        match cp.and_then(|cp| char::from_u32(cp as u32)) {
            Some(c) => out.push(c),
            None => return Err("invalid UTF-8 sequence in string".into()),
        }
        i += len;
    }
    Ok(out)
}

/// Four hex digits as QEMU's `cvt4hex` reads them; -1 if any is not one.
fn hex4(s: &[u8]) -> i32 {
    let mut cp = 0i32;
    for i in 0..4 {
        let Some(digit) = s.get(i).and_then(|&b| (b as char).to_digit(16)) else {
            return -1;
        };
        cp = (cp << 4) | digit as i32;
    }
    cp
}

/// A code point QEMU accepts in a string: in range, not a surrogate, not one of
/// Unicode's noncharacters.
fn valid_codepoint(cp: i32) -> Option<char> {
    if !(0..=0x10FFFF).contains(&cp)
        || (0xFDD0..=0xFDEF).contains(&cp)
        || (cp & 0xFFFE) == 0xFFFE
        || (0xD800..=0xDFFF).contains(&cp)
    {
        return None;
    }
    char::from_u32(cp as u32)
}

/// util/unicode.c's `mod_utf8_codepoint`: the code point at the start of `s` in
/// modified UTF-8 (`C0 80` is U+0000) and how many bytes QEMU steps over; `None`
/// for an invalid sequence. `s` is not empty.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<i32>, usize) {
    const MIN: [i32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let first = s[0];
    if first == 0 {
        return (None, 1);
    }
    if first < 0x80 {
        return (Some(first as i32), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return (None, 1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = (first & (0xFFu8 >> (len + 1))) as i32;
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => cp = (cp << 6) | (b & 0x3F) as i32,
            _ => return (None, i),
        }
    }
    let valid = valid_codepoint(cp).is_some() && (cp >= MIN[len - 2] || (cp == 0 && len == 2));
    (valid.then_some(cp), len)
}

/// Bytes as QEMU's writer shows them in a string: each invalid sequence becomes
/// U+FFFD, `C0 80` becomes U+0000.
fn sanitize(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let (cp, len) = mod_utf8_codepoint(&bytes[i..]);
        out.push(
            cp.and_then(|cp| char::from_u32(cp as u32))
                .unwrap_or('\u{FFFD}'),
        );
        i += len;
    }
    out
}

/// QEMU's QDict bucket for a key (qdict.c's `tdb_hash` modulo 512): QEMU writes
/// an object's members bucket by bucket.
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add((b as u32) << ((i as u32 * 5) % 24));
    }
    1103515243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// The keys of `object` in the order QEMU iterates them: by bucket, and within a
/// bucket the latest inserted first (as QEMU builds a dict it parses).
pub fn qdict_order(object: &Map<String, Value>) -> Vec<&String> {
    by_bucket(object, true)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// `object`'s members sorted by QDict bucket; within a bucket the latest first or
/// in `object`'s order.
fn by_bucket(object: &Map<String, Value>, latest_first: bool) -> Vec<(&String, &Value)> {
    let mut members: Vec<(u32, usize, (&String, &Value))> = object
        .iter()
        .enumerate()
        .map(|(i, member)| {
            let rank = if latest_first { usize::MAX - i } else { i };
            (qdict_bucket(member.0), rank, member)
        })
        .collect();
    members.sort_unstable_by_key(|&(bucket, rank, _)| (bucket, rank));
    members.into_iter().map(|(_, _, member)| member).collect()
}

/// `value` as QEMU's monitor writes it (without the line ending).
pub fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                out.extend_from_slice(format_g17(n.as_f64().unwrap_or(f64::NAN)).as_bytes());
            }
        }
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(object) => write_object(object, out),
    }
}

/// Writes an object as QEMU's writer does (see [`write`]), without wrapping it in
/// a [`Value`] first.
pub fn write_object(object: &Map<String, Value>, out: &mut Vec<u8>) {
    out.push(b'{');
    // By bucket, as QEMU iterates; within a bucket the order the object came in,
    // which for QEMU's own objects passed on is QEMU's order.
    for (i, (key, value)) in by_bucket(object, false).into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        write_str(key, out);
        out.extend_from_slice(b": ");
        write(value, out);
    }
    out.push(b'}');
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    use std::io::Write;
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            c if (c as u32) > 0xFFFF => {
                let cp = c as u32 - 0x10000;
                let _ = write!(
                    out,
                    "\\u{:04X}\\u{:04X}",
                    0xD800 + (cp >> 10),
                    0xDC00 + (cp & 0x3FF)
                );
            }
            c => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
        }
    }
    out.push(b'"');
}

/// C's `printf("%.17g", x)`: 17 significant digits, trailing zeros removed,
/// exponent form below 1e-4 and from 1e17 on.
fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // 17 significant digits, rounded as printf rounds (exactly, half to even on
    // the binary value, which Rust's formatting also does).
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is a number");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if !(-4..17).contains(&exp) {
        let mut m = format!("{}.{}", &digits[..1], &digits[1..]);
        trim_fraction(&mut m);
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let mut fixed = if exp >= 0 {
        let point = exp as usize + 1;
        format!("{}.{}", &digits[..point], &digits[point..])
    } else {
        format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
    };
    trim_fraction(&mut fixed);
    format!("{sign}{fixed}")
}

fn trim_fraction(s: &mut String) {
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_comes_with_its_size() {
        let mut reader = Reader::new(1 << 20, 64);
        let mut out = Vec::new();
        reader.push(br#"{"a": 1} [2, "xy"] {"#, &mut out);
        assert_eq!(out.len(), 2);
        // `{` `"a"` `:` `1` `}`, then `[` `2` `,` `"xy"` `]`.
        assert_eq!(reader.sizes(), [7, 8]);
        reader.push(b"}", &mut out);
        assert_eq!(reader.sizes(), [2], "sizes are those of the latest push");
    }
    use serde_json::json;

    fn read(input: &[u8]) -> Vec<Input> {
        let mut reader = Reader::new(1 << 20, 64);
        let mut out = Vec::new();
        reader.push(input, &mut out);
        out
    }

    fn err(desc: &str) -> Input {
        Input::Error(desc.into())
    }

    #[test]
    fn values_back_to_back_and_byte_by_byte() {
        let input = br#"{"execute": "a"}{'execute': 'b\'s "x"'} [1, 2.5, -0, true, null] "#;
        let expected = vec![
            Input::Value(json!({"execute": "a"})),
            Input::Value(json!({"execute": "b's \"x\""})),
            Input::Value(json!([1, 2.5, 0, true, null])),
        ];
        assert_eq!(read(input), expected);
        let mut reader = Reader::new(1 << 20, 64);
        let mut out = Vec::new();
        for b in input {
            reader.push(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn a_number_or_keyword_waits_for_the_byte_after_it() {
        assert_eq!(read(b"42"), vec![]);
        assert_eq!(read(b"42 "), vec![Input::Value(json!(42))]);
        assert_eq!(
            read(b"true{}"),
            vec![Input::Value(json!(true)), Input::Value(json!({}))]
        );
    }

    #[test]
    fn a_stray_byte_is_reported_and_the_partial_message_dropped() {
        // QEMU: the control byte ends the message being read; recovery resumes at
        // the next structural character, so `}` is a message of its own.
        assert_eq!(
            read(b"{\"execute\": \x01 \"query-status\"}{\"execute\": \"x\"}"),
            vec![
                err("JSON parse error, stray '\u{1}'"),
                err("JSON parse error, expecting value"),
                Input::Value(json!({"execute": "x"})),
            ]
        );
        assert_eq!(
            read(b"\xff{}"),
            vec![
                err("JSON parse error, stray '\u{FFFD}'"),
                Input::Value(json!({}))
            ]
        );
        assert_eq!(
            read(b"Xyz {}"),
            vec![err("JSON parse error, stray 'X'"), Input::Value(json!({}))]
        );
        assert_eq!(read(b"01 "), vec![err("JSON parse error, stray '01'")]);
        assert_eq!(
            read(b"\"a\nb\" "),
            vec![err("JSON parse error, stray '\"a\n'")]
        );
    }

    #[test]
    fn parser_errors_use_qemus_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
            (b"{\"a\": }", "JSON parse error, expecting value"),
            (b"{1: 2}", "JSON parse error, key is not a string in object"),
            (
                b"{\"a\": 1 \"b\": 2}",
                "JSON parse error, expected separator in dict",
            ),
            (b"[1 2]", "JSON parse error, expected separator in list"),
            (b"[1,]", "JSON parse error, expecting value"),
            (b"{\"a\": 1, \"a\": 2}", "JSON parse error, duplicate key"),
            (b"{\"a\": nul}", "JSON parse error, invalid keyword 'nul'"),
            (b"]", "JSON parse error, expecting value"),
            (b"{]", "JSON parse error, expecting value"),
            (
                b"\"\\x\"",
                "JSON parse error, invalid escape sequence in string",
            ),
            (
                b"\"\\uD800\"",
                "JSON parse error, \\uD800 is not a valid Unicode character",
            ),
            (
                b"\"\\uDC00\"",
                "JSON parse error, \\uDC00 is not a valid Unicode character",
            ),
            (
                b"\"\\uD800\\u0041\"",
                "JSON parse error, \\uD800 is not a valid Unicode character",
            ),
            (
                b"\"\\uFFFF\"",
                "JSON parse error, \\uFFFF is not a valid Unicode character",
            ),
            (
                b"\"\\u12\"",
                "JSON parse error, \\u12\" is not a valid Unicode character",
            ),
            (
                b"\"\xc3\x28\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xed\xa0\x80\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
            (
                b"\"\xc1\xbf\"",
                "JSON parse error, invalid UTF-8 sequence in string",
            ),
        ];
        for (input, desc) in cases {
            assert_eq!(
                read(input),
                vec![err(desc)],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn strings_decode_as_qemu_decodes_them() {
        assert_eq!(
            read(b"[\"\\uD83D\\uDE00\", \"\xc0\x80\", \"\\u0000\", \"\xc3\xa9\\/\"]"),
            vec![Input::Value(json!([
                "\u{1F600}",
                "\u{0}",
                "\u{0}",
                "\u{e9}/"
            ]))]
        );
    }

    #[test]
    fn numbers_are_i64_then_u64_then_double() {
        assert_eq!(
            read(b"[9223372036854775807, 18446744073709551615, 18446744073709551616, -9223372036854775809]"),
            vec![Input::Value(json!([
                i64::MAX,
                u64::MAX,
                18446744073709551616.0,
                -9223372036854775809.0
            ]))]
        );
    }

    #[test]
    fn over_the_limits_one_error_and_the_rest_skipped() {
        let mut reader = Reader::new(32, 4);
        let mut out = Vec::new();
        let big = format!(
            r#"{{"execute": "{}", "x": [1, {{"y": 2}}]}}{{"id": 1}}"#,
            "a".repeat(100)
        );
        reader.push(big.as_bytes(), &mut out);
        assert_eq!(out, vec![Input::TooLarge, Input::Value(json!({"id": 1}))]);
        out.clear();
        reader.push(b"[[[[[[\"]]]]]]\"]]]]]] {}", &mut out);
        assert_eq!(out, vec![Input::TooDeep, Input::Value(json!({}))]);
        assert!(reader.token.capacity() <= 64 * 1024);
    }

    #[test]
    fn memory_stays_bounded_for_an_endless_string() {
        let mut reader = Reader::new(1024, 8);
        let mut out = Vec::new();
        reader.push(b"{\"a\": \"", &mut out);
        for _ in 0..1000 {
            reader.push(&[b'x'; 1024], &mut out);
        }
        assert_eq!(out, vec![Input::TooLarge]);
        assert!(reader.token.capacity() <= 2048);
        assert!(reader.in_message());
    }

    fn written(value: &Value) -> String {
        let mut out = Vec::new();
        write(value, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_as_qemu_does() {
        assert_eq!(
            written(&json!({"return": {}, "id": 1})),
            r#"{"return": {}, "id": 1}"#
        );
        assert_eq!(
            written(&json!({"error": {"class": "GenericError", "desc": "x"}, "id": "a"})),
            r#"{"id": "a", "error": {"class": "GenericError", "desc": "x"}}"#
        );
        assert_eq!(
            written(
                &json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}})
            ),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "data": {}}"#
        );
        assert_eq!(
            written(&json!(["é\u{0}\u{1F600}\n\"\\/", [], {}])),
            r#"["\u00E9\u0000\uD83D\uDE00\n\"\\/", [], {}]"#
        );
    }

    #[test]
    fn doubles_print_as_printf_17g() {
        for (x, s) in [
            (1.0, "1"),
            (0.1, "0.10000000000000001"),
            (1.5, "1.5"),
            (-2.5e-5, "-2.5000000000000001e-05"),
            (1e17, "1e+17"),
            (1e16, "10000000000000000"),
            (123456.789, "123456.789"),
            (0.0001, "0.0001"),
            (1.8446744073709552e19, "1.8446744073709552e+19"),
        ] {
            assert_eq!(format_g17(x), s, "{x}");
        }
    }
}
