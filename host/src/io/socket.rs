//! Sockets: a chardev spec's listening socket or connection, as tokio streams.

use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use qmpgate_protocol::chardev::{Access, Address, ChardevSpec, Peer};

use super::SocketError;
use super::adopt;
use super::fds::FdTable;

/// Opens the listening socket of a `server=on` chardev.
pub fn listen(spec: &ChardevSpec, fds: &mut FdTable) -> Result<Listener, SocketError> {
    let io = |action: String| {
        let id = spec.id.clone();
        move |source| SocketError::Io { id, action, source }
    };
    match &spec.address {
        Address::Path(path) => {
            remove_stale_socket(&spec.id, path)?;
            let listener = if spec.access.shapes_file() {
                bind_shaped(path, &spec.access).map_err(io(format!("bind {}", path.display())))?
            } else {
                UnixListener::bind(path).map_err(io(format!("bind {}", path.display())))?
            };
            let unlink =
                UnlinkOnDrop::new(path.clone()).map_err(io(format!("stat {}", path.display())))?;
            Ok(Listener::Unix {
                listener,
                unlink: Some(unlink),
            })
        }
        Address::Tcp { host, port } => {
            let std = std::net::TcpListener::bind((host.as_str(), *port))
                .map_err(io(format!("bind {host}:{port}")))?;
            std.set_nonblocking(true)
                .map_err(io("set non-blocking".into()))?;
            Ok(Listener::Tcp(
                TcpListener::from_std(std).map_err(io("register with tokio".into()))?,
            ))
        }
        Address::Fd(_) | Address::Systemd(_) | Address::Named(_) => {
            let socket = fds.take(spec)?;
            let socket = adopt::validate(&spec.id, &spec.address, socket, true)?;
            socket
                .into_listener()
                .map_err(io("register with tokio".into()))
        }
    }
}

/// Connects a `server=off` chardev (or adopts its connected fd). One attempt:
/// retrying is the caller's choice (see `reconnect_ms`).
pub async fn connect(spec: &ChardevSpec, fds: &mut FdTable) -> Result<Stream, SocketError> {
    let io = |action: String| {
        let id = spec.id.clone();
        move |source| SocketError::Io { id, action, source }
    };
    match &spec.address {
        Address::Path(path) => Ok(Stream::Unix(
            UnixStream::connect(path)
                .await
                .map_err(io(format!("connect to {}", path.display())))?,
        )),
        Address::Tcp { host, port } => Ok(Stream::Tcp(
            TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(io(format!("connect to {host}:{port}")))?,
        )),
        Address::Fd(_) | Address::Systemd(_) | Address::Named(_) => {
            let socket = fds.take(spec)?;
            let socket = adopt::validate(&spec.id, &spec.address, socket, false)?;
            socket
                .into_stream()
                .map_err(io("register with tokio".into()))
        }
    }
}

/// QEMU unlinks any socket at the path before binding; qmpgate unlinks only a
/// stale one (nothing accepts on it), so that a mistaken or malicious
/// `chardev-add` cannot cut a live server (QEMU's monitor, another listener) off
/// from its clients, and never anything that is not a socket.
fn remove_stale_socket(id: &str, path: &Path) -> Result<(), SocketError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                // Refused: a socket file whose server is gone.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                _ => {
                    return Err(SocketError::SocketInUse {
                        id: id.to_string(),
                        path: path.to_path_buf(),
                    });
                }
            }
            std::fs::remove_file(path).map_err(|source| SocketError::Io {
                id: id.to_string(),
                action: format!("remove stale socket {}", path.display()),
                source,
            })
        }
        Ok(_) => Err(SocketError::PathNotSocket {
            id: id.to_string(),
            path: path.to_path_buf(),
        }),
        Err(_) => Ok(()),
    }
}

/// Binds a unix socket at `path` with `access`'s mode and owner and no moment in
/// which it is wider: bound in a fresh 0700 directory beside `path` (nobody else
/// can reach into it), given its mode and owner there, then renamed into place.
fn bind_shaped(path: &Path, access: &Access) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".qmpgate-bind-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)?;
    let staged = private.path().join("socket");
    let listener = UnixListener::bind(&staged)?;
    if let Some(mode) = access.perm {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    }
    if access.owner.is_some() || access.group.is_some() {
        std::os::unix::fs::chown(&staged, access.owner, access.group)?;
    }
    // Never over something that appeared at the path meanwhile.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &staged,
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )?;
    Ok(listener)
}

/// A listening socket, ready to accept.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Removes the path qmpgate bound when dropped (not an inherited socket's
        /// path: the parent owns that).
        unlink: Option<UnlinkOnDrop>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for the next client.
    pub async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        match self {
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer::Unix {
                        pid: cred.pid().unwrap_or(0),
                        uid: cred.uid(),
                        gid: cred.gid(),
                    },
                    Err(_) => Peer::Unknown,
                };
                Ok((Stream::Unix(stream), peer))
            }
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                // QMP is request/response with small messages: Nagle only adds latency.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), Peer::Inet(addr.to_string())))
            }
        }
    }

    /// The bound address, for logs and status (`port=0` becomes the real port).
    pub fn local_description(&self) -> String {
        match self {
            // qmpgate binds in a private folder and renames the socket into place;
            // the kernel still reports the name it was bound with.
            Listener::Unix {
                unlink: Some(unlink),
                ..
            } => format!("unix:{}", unlink.path.display()),
            Listener::Unix { listener, .. } => match listener.local_addr() {
                Ok(addr) => match addr.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".into(),
                },
                Err(_) => "unix:?".into(),
            },
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => format!("tcp:{addr}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }
}

/// Removes the socket qmpgate bound at a path when dropped, if the path is still
/// that socket (not one another process bound there since).
#[derive(Debug)]
pub struct UnlinkOnDrop {
    path: PathBuf,
    /// The bound socket's device and inode.
    identity: (u64, u64),
}

impl UnlinkOnDrop {
    /// Remembers the socket now at `path`.
    pub(super) fn new(path: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(UnlinkOnDrop {
            path,
            identity: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for UnlinkOnDrop {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    /// Unix stream socket.
    Unix(UnixStream),
    /// TCP stream.
    Tcp(TcpStream),
    /// TLS over either (listeners with `tls-creds=`).
    Tls(Box<tokio_rustls::server::TlsStream<Stream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Stream {
    /// Writes what the socket takes at once, without waiting (a last word to a
    /// peer that is being turned away); TLS streams are left alone.
    pub fn try_write_once(&self, bytes: &[u8]) {
        let _ = match self {
            Stream::Unix(s) => s.try_write(bytes),
            Stream::Tcp(s) => s.try_write(bytes),
            Stream::Tls(_) => Ok(0),
        };
    }

    /// Splits into owned read and write halves.
    pub fn into_split(
        self,
    ) -> (
        Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    ) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// A checked socket becomes tokio's here: adoption knows nothing of tokio's types.
impl adopt::Socket {
    fn into_listener(self) -> std::io::Result<Listener> {
        match self {
            adopt::Socket::Unix(fd) => Ok(Listener::Unix {
                listener: UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?,
                unlink: None,
            }),
            adopt::Socket::Inet(fd) => Ok(Listener::Tcp(TcpListener::from_std(
                std::net::TcpListener::from(fd),
            )?)),
        }
    }

    fn into_stream(self) -> std::io::Result<Stream> {
        match self {
            adopt::Socket::Unix(fd) => Ok(Stream::Unix(UnixStream::from_std(
                std::os::unix::net::UnixStream::from(fd),
            )?)),
            adopt::Socket::Inet(fd) => Ok(Stream::Tcp(TcpStream::from_std(
                std::net::TcpStream::from(fd),
            )?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use super::*;

    #[tokio::test]
    async fn adopting_bad_fds_fails_clearly() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let raw = file.as_raw_fd();
        let mut inherited = FdTable::from_fds([OwnedFd::from(file)]);
        let spec = ChardevSpec::parse("socket,id=x,fd=999,server=on").unwrap();
        assert!(matches!(
            listen(&spec, &mut inherited),
            Err(SocketError::FdNotOpen { fd: 999, .. })
        ));
        let spec = ChardevSpec::parse(&format!("socket,id=x,fd={raw},server=on")).unwrap();
        assert!(
            matches!(listen(&spec, &mut inherited), Err(SocketError::NotASocket { fd, .. }) if fd == format!("fd {raw}"))
        );
    }

    #[tokio::test]
    async fn adopting_a_listener_as_a_client_is_a_mode_error() {
        let dir = std::env::temp_dir().join(format!("qmpgate-chardev-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let listener = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
        let raw = listener.as_raw_fd();
        let mut inherited = FdTable::from_fds([OwnedFd::from(listener)]);
        let spec = ChardevSpec::parse(&format!("socket,id=x,fd={raw}")).unwrap();
        let e = connect(&spec, &mut inherited)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is a listening socket, but the spec says server=off"),
            "{e}"
        );
        // The fd was claimed: a second chardev cannot take it again.
        let again = ChardevSpec::parse(&format!("socket,id=y,fd={raw},server=on")).unwrap();
        assert!(matches!(
            listen(&again, &mut inherited),
            Err(SocketError::FdInUse { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
