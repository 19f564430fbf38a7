//! QEMU's monitor protocol and chardev specs, as data: the layer of qmpgate that
//! gives bytes and strings their meaning and does no I/O.
//!
//! Layers, each using only those above it in this list:
//! - [`framing`]: splitting QEMU's output into JSON messages, with limits;
//! - [`qjson`]: QEMU's JSON dialect, byte for byte: the reader clients get (QEMU's
//!   lexer, recovery and error texts) and the writer replies go out with;
//! - [`qmp`]: QMP's messages (commands, replies, events, greetings) and QEMU's
//!   error classes and texts;
//! - [`schema`]: QEMU's QMP schema (`query-qmp-schema`): argument checks with
//!   QEMU's texts, and command descriptions for plugins;
//! - [`qemuopts`]: QEMU's `key=value,...` option strings, split once for all;
//! - [`chardev`]: QEMU's `-chardev socket,...` specs and what each key means;
//! - [`cmdline`]: QEMU's command line, read for the fds its arguments name;
//! - [`lock`]: poison-recovering locks, shared by every crate of qmpgate.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod chardev;
pub mod cmdline;
pub mod framing;
pub mod lock;
pub mod qemuopts;
pub mod qjson;
pub mod qmp;
pub mod schema;
