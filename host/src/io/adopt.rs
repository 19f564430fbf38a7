//! Adopting raw fds, inherited or received over SCM_RIGHTS: the only `unsafe` code
//! in qmpgate. An inherited fd is checked (open, a stream socket, in the mode its
//! spec says) before it becomes a tokio socket; a received one is owned at once.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use qmpgate_protocol::chardev::Address;

use tokio::net::UnixStream;

use super::SocketError;
use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};
use nix::sys::stat::{SFlag, fstat};
use std::os::fd::{AsFd, FromRawFd};

/// A checked socket of a known family.
pub(crate) enum Socket {
    Unix(OwnedFd),
    Inet(OwnedFd),
}

/// Takes ownership of every open fd above stderr, marking each close-on-exec.
pub(crate) fn take_all_inherited() -> HashMap<RawFd, OwnedFd> {
    // Listing /proc/self/fd opens a descriptor of its own; collect the numbers
    // first, close the listing, then keep only what is still open.
    let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut fds = HashMap::new();
    for fd in numbers {
        // SAFETY: F_GETFD reads the descriptor flags and nothing else; an fd that is
        // not open (the listing's own) fails with EBADF and is left alone.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: this runs first thing in `main`, before qmpgate opens any file, so
        // every open fd above stderr was inherited from the parent and nothing else
        // in the process owns it; each number is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            owned.as_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        fds.insert(fd, owned);
    }
    fds
}

/// Checks that the fd is a stream socket in the mode the spec wants, and marks it
/// close-on-exec and non-blocking.
pub(crate) fn validate(
    id: &str,
    address: &Address,
    owned: OwnedFd,
    listening: bool,
) -> Result<Socket, SocketError> {
    // Name the fd as the user did: a number, a getfd name, a systemd name.
    let fd = match address {
        Address::Systemd(name) => format!("systemd socket '{name}'"),
        Address::Named(name) => format!("fd '{name}'"),
        _ => format!("fd {}", owned.as_raw_fd()),
    };
    let io = |action: &str| {
        let (id, action) = (id.to_string(), action.to_string());
        move |e: nix::Error| SocketError::Io {
            id,
            action,
            source: std::io::Error::from(e),
        }
    };
    let stat = fstat(owned.as_fd()).map_err(io("fstat"))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(SocketError::NotASocket {
            id: id.to_string(),
            fd,
        });
    }
    if getsockopt(&owned, sockopt::SockType).map_err(io("getsockopt(SO_TYPE)"))? != SockType::Stream
    {
        return Err(SocketError::NotStream {
            id: id.to_string(),
            fd,
        });
    }
    let accepting =
        getsockopt(&owned, sockopt::AcceptConn).map_err(io("getsockopt(SO_ACCEPTCONN)"))?;
    let connected =
        !accepting && nix::sys::socket::getpeername::<SockaddrStorage>(owned.as_raw_fd()).is_ok();
    if listening != accepting || (!listening && !connected) {
        let actual = if accepting {
            "a listening socket"
        } else if connected {
            "a connected socket"
        } else {
            "neither listening nor connected"
        };
        return Err(SocketError::WrongMode {
            id: id.to_string(),
            fd,
            actual,
            expected: if listening { "on" } else { "off" },
        });
    }
    nix::fcntl::fcntl(
        owned.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io("set close-on-exec"))?;
    let flags =
        nix::fcntl::fcntl(owned.as_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(io("get flags"))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(owned.as_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(io("set non-blocking"))?;
    let addr: SockaddrStorage = getsockname(owned.as_raw_fd()).map_err(io("getsockname"))?;
    match addr.family() {
        Some(AddressFamily::Unix) => Ok(Socket::Unix(owned)),
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => Ok(Socket::Inet(owned)),
        other => Err(SocketError::Family {
            id: id.to_string(),
            fd,
            family: format!("{other:?}"),
        }),
    }
}

/// Reads bytes and any fds passed with them (SCM_RIGHTS). Received fds are
/// close-on-exec from the start (MSG_CMSG_CLOEXEC).
pub async fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        stream.readable().await?;
        let result = stream.try_io(tokio::io::Interest::READABLE, || {
            recv(stream.as_raw_fd(), buf)
        });
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Fds taken per read, as QEMU's socket chardev (`TCP_MAX_FDS`); the kernel
/// closes any beyond them.
const MAX_FDS_PER_READ: usize = 16;

/// One `recvmsg`: the bytes and the fds that came with them, close-on-exec.
pub(super) fn recv(socket: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg};
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        socket,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for message in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = message {
            for fd in raw {
                // SAFETY: the kernel just installed this fd in our table for this
                // message; nothing else in the process knows its number.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}
