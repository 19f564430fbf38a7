//! The fd table: sockets inherited from the parent or systemd at start, and fds
//! received by name at run time (`getfd`), each claimed at most once.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use qmpgate_protocol::chardev::{Address, ChardevSpec};

use thiserror::Error;

use super::SocketError;
use super::adopt;

/// Why an inherited fd that QEMU's own arguments name cannot be passed to QEMU.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum PassError {
    /// The parent did not pass qmpgate that fd (or it is not open).
    #[error(
        "QEMU's argument '{named_by}' names fd {fd}, which qmpgate did not inherit (did the parent process pass it?)"
    )]
    NotInherited { fd: RawFd, named_by: String },
    /// A chardev of qmpgate's own claimed that fd.
    #[error("QEMU's argument '{named_by}' names fd {fd}, which is already used by {other}")]
    InUse {
        fd: RawFd,
        named_by: String,
        other: String,
    },
}

/// Fds this process was given at start. qmpgate takes ownership of every one of
/// them before it opens anything itself (so `fd=N` can never name one of qmpgate's
/// own descriptors) and marks them close-on-exec (so none leaks into QEMU). Each
/// is then claimed at most once: by an `fd=N` or `systemd=NAME` chardev, or, under
/// `qmpgate run`, by QEMU's own arguments (`-add-fd fd=N`), to be passed on.
#[derive(Debug, Default)]
pub struct FdTable {
    /// FdTable fds not claimed yet.
    fds: HashMap<RawFd, OwnedFd>,
    /// systemd's fds with their LISTEN_FDNAMES names, not yet claimed.
    systemd: Vec<(String, RawFd)>,
    /// Every fd claimed so far, with who claimed it (`chardev 'qmp'`, `QEMU's
    /// -add-fd fd=30,set=0`), for the error a second claim gets.
    claimed: Vec<(RawFd, String)>,
    /// Fds received at run time with `getfd`, by name.
    named: HashMap<String, OwnedFd>,
}

impl FdTable {
    /// Takes every fd above stderr and reads systemd's LISTEN_PID / LISTEN_FDS /
    /// LISTEN_FDNAMES (ignored when LISTEN_PID is another process's, as
    /// sd_listen_fds does). Call first thing in `main`, before any file is opened.
    pub fn from_process() -> Self {
        let vars = |k: &str| std::env::var(k).ok();
        let mut inherited = FdTable::from_vars(
            vars("LISTEN_PID").as_deref(),
            vars("LISTEN_FDS").as_deref(),
            vars("LISTEN_FDNAMES").as_deref(),
            std::process::id(),
        );
        inherited.fds = adopt::take_all_inherited();
        inherited
    }

    /// FdTable fds from a list (for embedding qmpgate, and tests).
    pub fn from_fds(fds: impl IntoIterator<Item = OwnedFd>) -> Self {
        FdTable {
            fds: fds.into_iter().map(|fd| (fd.as_raw_fd(), fd)).collect(),
            ..Default::default()
        }
    }

    /// Stores an fd under a name (`getfd`); an fd already under that name is closed,
    /// as QEMU does.
    pub fn add_named(&mut self, name: &str, fd: OwnedFd) {
        self.named.insert(name.to_string(), fd);
    }

    /// Closes a named fd (`closefd`); false if there is none by that name.
    pub fn close_named(&mut self, name: &str) -> bool {
        self.named.remove(name).is_some()
    }

    /// Whether an fd is held under `name`.
    pub fn has_named(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    /// How many named fds are held.
    pub fn named_len(&self) -> usize {
        self.named.len()
    }

    /// The names of the fds held, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.named.keys().cloned().collect();
        names.sort();
        names
    }

    fn from_vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>, our_pid: u32) -> Self {
        /// systemd passes fds from 3 (SD_LISTEN_FDS_START).
        const FIRST: RawFd = 3;
        let mut inherited = FdTable::default();
        if pid.and_then(|p| p.parse::<u32>().ok()) != Some(our_pid) {
            return inherited;
        }
        let count = fds.and_then(|n| n.parse::<RawFd>().ok()).unwrap_or(0);
        let names: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
        for i in 0..count.max(0) {
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            inherited.systemd.push((name.to_string(), FIRST + i));
        }
        inherited
    }

    /// Claims the fd of an `fd=` or `systemd=` chardev.
    pub(super) fn take(&mut self, spec: &ChardevSpec) -> Result<OwnedFd, SocketError> {
        let fd = match &spec.address {
            Address::Fd(fd) => *fd,
            Address::Systemd(name) => {
                let Some(pos) = self.systemd.iter().position(|(n, _)| n == name) else {
                    let available: Vec<&str> =
                        self.systemd.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(SocketError::NoSystemdFd {
                        id: spec.id.clone(),
                        name: name.clone(),
                        available: if available.is_empty() {
                            "none".into()
                        } else {
                            available.join(":")
                        },
                    });
                };
                self.systemd.remove(pos).1
            }
            Address::Named(name) => {
                let fd = self
                    .named
                    .remove(name)
                    .ok_or_else(|| SocketError::NoNamedFd {
                        id: spec.id.clone(),
                        name: name.clone(),
                    })?;
                return Ok(fd);
            }
            _ => unreachable!("only fd= and systemd= chardevs claim inherited fds"),
        };
        if let Some((_, other)) = self.claimed.iter().find(|(c, _)| *c == fd) {
            return Err(SocketError::FdInUse {
                id: spec.id.clone(),
                fd,
                other: other.clone(),
            });
        }
        let owned = self.fds.remove(&fd).ok_or_else(|| SocketError::FdNotOpen {
            id: spec.id.clone(),
            fd,
        })?;
        self.claimed.push((fd, format!("chardev '{}'", spec.id)));
        Ok(owned)
    }

    /// Claims an inherited fd that QEMU's own arguments name (`named_by`, e.g.
    /// `-add-fd set=0,fd=30`), for `qmpgate run` to pass on to QEMU as it is.
    pub fn take_for_qemu(&mut self, fd: RawFd, named_by: &str) -> Result<OwnedFd, PassError> {
        if let Some((_, other)) = self.claimed.iter().find(|(c, _)| *c == fd) {
            return Err(PassError::InUse {
                fd,
                named_by: named_by.to_string(),
                other: other.clone(),
            });
        }
        let owned = self
            .fds
            .remove(&fd)
            .ok_or_else(|| PassError::NotInherited {
                fd,
                named_by: named_by.to_string(),
            })?;
        self.claimed
            .push((fd, format!("QEMU's argument '{named_by}'")));
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fd_for_qemu_is_claimed_once_and_only_if_inherited() {
        let (read, write) = nix::unistd::pipe().unwrap();
        let (r, w) = (read.as_raw_fd(), write.as_raw_fd());
        let mut table = FdTable::from_fds([read, write]);
        let passed = table.take_for_qemu(r, "-add-fd set=0,fd=N").unwrap();
        assert_eq!(passed.as_raw_fd(), r);
        let again = table.take_for_qemu(r, "-add-fd set=1,fd=N").unwrap_err();
        assert_eq!(
            again.to_string(),
            format!(
                "QEMU's argument '-add-fd set=1,fd=N' names fd {r}, which is already used by \
                 QEMU's argument '-add-fd set=0,fd=N'"
            )
        );
        let chardev = ChardevSpec::parse(&format!("socket,id=qmp,fd={r},server=on")).unwrap();
        let Err(e) = table.take(&chardev) else {
            panic!("a chardev took QEMU's fd");
        };
        assert_eq!(
            e.to_string(),
            format!(
                "chardev 'qmp': fd {r} is already used by QEMU's argument '-add-fd set=0,fd=N'"
            )
        );
        let chardev = ChardevSpec::parse(&format!("socket,id=qmp,fd={w},server=on")).unwrap();
        table.take(&chardev).unwrap();
        assert!(matches!(
            table.take_for_qemu(w, "-chardev socket,id=c,fd=N"),
            Err(PassError::InUse { other, .. }) if other == "chardev 'qmp'"
        ));
        assert!(matches!(
            table.take_for_qemu(9999, "-incoming fd:9999"),
            Err(PassError::NotInherited { fd: 9999, .. })
        ));
    }

    #[test]
    fn systemd_fds_are_ignored_when_meant_for_another_process() {
        assert!(
            FdTable::from_vars(Some("1"), Some("2"), None, 99)
                .systemd
                .is_empty()
        );
        let i = FdTable::from_vars(Some("99"), Some("2"), Some("qmp:status"), 99);
        assert_eq!(
            i.systemd,
            vec![("qmp".to_string(), 3), ("status".to_string(), 4)]
        );
    }
}
