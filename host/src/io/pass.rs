//! Fds that travel with bytes (SCM_RIGHTS): a client's read half that keeps the
//! fds its reads bring, and a link's write half that sends fds with a message.
//!
//! QEMU's monitor keeps the fds that arrive with its input until a command takes
//! them (`getfd`, `add-fd`); newer ones replace older ones, which it closes.
//! [`FdReader`] keeps them the same way, so a client of a listener with
//! `fds=pass` sees QEMU's behaviour; on any other listener a plain read leaves
//! the fds to the kernel, which closes them.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use qmpgate_protocol::lock;

/// The fds a client sent and no command has taken yet: the latest read's that
/// brought any (QEMU's rule).
#[derive(Debug, Default, Clone)]
pub struct HeldFds(Arc<Mutex<Vec<OwnedFd>>>);

impl HeldFds {
    /// Takes the held fds, leaving none.
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *lock::mutex(&self.0))
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        lock::mutex(&self.0).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, fds: Vec<OwnedFd>) {
        // The old ones are closed here, as QEMU closes fds no command took.
        *lock::mutex(&self.0) = fds;
    }
}

/// A unix socket's read half that keeps the fds each read brings in [`HeldFds`].
pub struct FdReader {
    half: OwnedReadHalf,
    held: HeldFds,
}

impl FdReader {
    /// Reads `half`, keeping fds in `held`.
    pub fn new(half: OwnedReadHalf, held: HeldFds) -> Self {
        FdReader { half, held }
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let stream: &tokio::net::UnixStream = this.half.as_ref();
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match stream.try_io(Interest::READABLE, || {
                super::adopt::recv(stream.as_raw_fd(), unfilled)
            }) {
                Ok((n, fds)) => {
                    if !fds.is_empty() {
                        this.held.replace(fds);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// A link's write half: a unix socket's can also send fds with a message.
pub enum LinkWriter {
    /// A unix socket.
    Unix(OwnedWriteHalf),
    /// TCP (no fds).
    Other(Box<dyn AsyncWrite + Send + Unpin>),
}

impl LinkWriter {
    /// Writes `bytes` with `fds` attached to their first byte, as QEMU expects
    /// fds with the command that takes them. The first `sendmsg` carries the fds;
    /// whatever it did not take is written after it.
    pub async fn write_with_fds(&mut self, bytes: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let LinkWriter::Unix(half) = self else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "fds travel over unix sockets only",
            ));
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let stream: &tokio::net::UnixStream = half.as_ref();
        let sent = loop {
            stream.writable().await?;
            let result = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[ControlMessage::ScmRights(&raw)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match result {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => break other?,
            }
        };
        half.write_all(&bytes[sent..]).await
    }

    /// Whether fds can be sent over it.
    pub fn passes_fds(&self) -> bool {
        matches!(self, LinkWriter::Unix(_))
    }
}

impl AsyncWrite for LinkWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            LinkWriter::Unix(w) => Pin::new(w).poll_write(cx, buf),
            LinkWriter::Other(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkWriter::Unix(w) => Pin::new(w).poll_flush(cx),
            LinkWriter::Other(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            LinkWriter::Unix(w) => Pin::new(w).poll_shutdown(cx),
            LinkWriter::Other(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// Reader and writer of a stream: a unix socket's reader keeps fds in `held`
/// when given one; the writer can send fds over a unix socket.
pub fn split(
    stream: super::Stream,
    held: Option<HeldFds>,
) -> (Box<dyn AsyncRead + Send + Unpin>, LinkWriter) {
    match stream {
        super::Stream::Unix(s) => {
            let (r, w) = s.into_split();
            let reader: Box<dyn AsyncRead + Send + Unpin> = match held {
                Some(held) => Box::new(FdReader::new(r, held)),
                None => Box::new(r),
            };
            (reader, LinkWriter::Unix(w))
        }
        other => {
            let (r, w) = other.into_split();
            (r, LinkWriter::Other(w))
        }
    }
}
