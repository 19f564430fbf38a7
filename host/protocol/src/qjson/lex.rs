//! json-lexer.c: the lexer's states and what each byte does in each, including
//! QEMU's recovery after an invalid byte.

/// Lexer states (json-lexer.c's `IN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
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
pub(super) enum Kind {
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
pub(super) enum Step {
    /// Consume the byte and go to this state.
    Go(State),
    /// The token is complete; `lookahead` leaves the byte for the next token.
    Emit(Kind, bool),
    /// The byte cannot continue or start a token (it is consumed).
    Error,
    /// Leave recovery without consuming the byte.
    Resume,
}

pub(super) fn step(state: State, b: u8) -> Step {
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

/// A complete token: its kind and its bytes.
#[derive(Debug)]
pub(super) struct Token {
    pub(super) kind: Kind,
    pub(super) text: Vec<u8>,
}
