//! The reader: the lexer over a client's bytes, and json-streamer.c's bracket
//! counting, under qmpgate's size and depth limits.

use super::Input;
use super::lex::{Kind, State, Step, Token, step};
use super::parse::{parse, sanitize};

/// An incremental reader of a client's byte stream, as QEMU's QMP monitor reads
/// it. Memory stays within about `max_message` bytes whatever the client sends.
#[derive(Debug)]
pub struct Reader {
    max_message: usize,
    max_depth: usize,
    state: State,
    /// The token being lexed.
    pub(super) token: Vec<u8>,
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
