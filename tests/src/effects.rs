//! What a QEMU process did to the host, observed from outside: files created,
//! changed or deleted, files opened (inotify), TCP listeners, connections to a
//! socket the test owns, and QEMU's own fd table. Security tests check these
//! effects, not just the error text a client got.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// QEMU's open fds: fd number to what it points at.
pub fn fd_table(pid: u32) -> BTreeMap<i32, String> {
    let mut table = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return table;
    };
    for entry in entries.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        table.insert(fd, target);
    }
    table
}

/// The fd numbers under which process `pid` holds the file or socket that `ours`
/// is open on (same device and inode), from its /proc fd links.
pub fn fds_open_on(pid: u32, ours: &impl std::os::fd::AsFd) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let ours = nix::sys::stat::fstat(ours.as_fd()).expect("fstat");
    fd_table(pid)
        .into_keys()
        .filter(|fd| {
            // stat() follows the link to the open file itself, sockets included.
            std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|m| m.dev() == ours.st_dev as u64 && m.ino() == ours.st_ino as u64)
        })
        .collect()
}

/// Whether anything on the host listens on TCP `port` (IPv4 or IPv6).
pub fn tcp_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is ADDR:PORT in hex; state 0A is LISTEN.
                fields.len() > 3
                    && fields[3] == "0A"
                    && fields[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private folder with a secret file, a victim file and a directory, watched for
/// opens, and a unix socket that records connections.
pub struct Sandbox {
    dir: tempfile::TempDir,
    inotify: Inotify,
    watched: BTreeMap<nix::sys::inotify::WatchDescriptor, PathBuf>,
    socket: UnixListener,
}

/// The victim file's content; a vector that overwrites or replaces it changes it.
pub const VICTIM: &str = "victim: must never change\n";

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Sandbox {
        let dir = crate::tempdir();
        std::fs::write(dir.path().join("secret"), "secret: must never be read\n").unwrap();
        std::fs::write(dir.path().join("victim"), VICTIM).unwrap();
        std::fs::create_dir(dir.path().join("dir")).unwrap();
        std::fs::write(dir.path().join("dir/file"), "in a host directory\n").unwrap();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        let mut watched = BTreeMap::new();
        for name in ["secret", "dir"] {
            let path = dir.path().join(name);
            let wd = inotify
                .add_watch(&path, AddWatchFlags::IN_OPEN | AddWatchFlags::IN_ACCESS)
                .unwrap();
            watched.insert(wd, path);
        }
        let socket = UnixListener::bind(dir.path().join("listening.sock")).unwrap();
        socket.set_nonblocking(true).unwrap();
        Sandbox {
            dir,
            inotify,
            watched,
            socket,
        }
    }

    /// A path in the sandbox (`secret`, `victim`, `dir`, or a new name).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The sandbox folder.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The paths opened or read since the last call (by anyone: tests must not
    /// touch them themselves).
    pub fn opened(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                if let Some(path) = self.watched.get(&event.wd)
                    && !paths.contains(path)
                {
                    paths.push(path.clone());
                }
            }
        }
        paths
    }

    /// Whether anything connected to `listening.sock` since the last call.
    pub fn connected(&self) -> bool {
        let mut any = false;
        while self.socket.accept().is_ok() {
            any = true;
        }
        any
    }

    /// Names in the sandbox besides the ones it was made with.
    pub fn new_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !matches!(n.as_str(), "secret" | "victim" | "dir" | "listening.sock"))
            .collect();
        names.sort();
        names
    }

    /// Whether the victim file is still the file it was, with its content.
    pub fn victim_intact(&self) -> bool {
        std::fs::read_to_string(self.path("victim")).is_ok_and(|s| s == VICTIM)
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}
