//! json-parser.c: one value from a complete token list (the first error wins),
//! and QEMU's decoding of strings (modified UTF-8, no noncharacters or surrogates).

use serde_json::{Map, Number, Value};

use super::lex::{Kind, Token};

/// json-parser.c: one value from a complete token list; the first error wins.
pub(super) fn parse(tokens: &[Token]) -> Result<Value, String> {
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
pub(super) fn sanitize(bytes: &[u8]) -> String {
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
