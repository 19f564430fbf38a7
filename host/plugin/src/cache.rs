//! The compile cache: plugins compiled to native code (`.cwasm` files), so that a
//! restart, a reload or a run-time `chardev-add` loads a plugin in a millisecond
//! instead of compiling it again.
//!
//! wasmtime runs a deserialized artifact as it is, so whoever can write an entry
//! chooses native code that qmpgate runs. The cache is trusted exactly as far as
//! these checks go:
//! - **the directory is checked and held.** [`CompileCache::open`] walks the path from
//!   `/` one component at a time (`openat` with `O_NOFOLLOW`: no symlinks, no `..`),
//!   checks every opened component with `fstat` (owned by qmpgate's effective uid or
//!   root and writable by nobody else; a root-owned sticky directory such as `/tmp` is
//!   allowed above the cache, since nobody else can rename or delete what lies in it),
//!   requires the cache directory itself to be qmpgate's own, and keeps that
//!   directory's fd. Every later read, create and rename is relative to that fd, so
//!   renaming or replacing the path after start-up changes nothing. A path that fails
//!   is never written to (nothing is created below a component that failed).
//! - **entries are written privately and atomically**: created `0600` with `O_EXCL`
//!   under a temporary name, then renamed into place.
//! - **entries are checked before deserializing**: an entry must be a regular file
//!   owned by qmpgate's uid and writable by nobody else, and open with a header (magic,
//!   the [`CacheKey`] it was made for, the SHA-256 of the artifact). The key is checked
//!   against the component being loaded (its SHA-256 with wasmtime's compatibility
//!   hash), the digest against the bytes read, and those same bytes (read once, so the
//!   file cannot change between check and use) are what wasmtime deserializes.
//!
//! The digests catch a misnamed, stale, truncated or damaged entry; they are not a
//! signature: anyone who can write the directory can compute them. No key would
//! help either: whoever can write a directory only qmpgate's uid and root can write
//! can also read any key qmpgate could keep. What keeps others out is the held,
//! checked directory.
//!
//! A failed check is logged once with its reason and the plugin is compiled instead:
//! a bad entry is removed (and rewritten), a directory that fails is not used.
//!
//! Layout: [`CompileCache`] holds the checked directory ([`CompileCache::open`]) and
//! reads and writes entries ([`CompileCache::load`], [`CompileCache::store`]);
//! [`CacheKey`] names them; [`CacheError`] says why a directory was refused.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component as PathPart, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The first bytes of every entry: the format, so that a file in another format
/// (an older qmpgate's bare artifact) is recognised and replaced, never deserialized.
const MAGIC: &[u8; 16] = b"qmpgate-cwasm-1\n";

/// Header length: [`MAGIC`], the entry's key, the SHA-256 of the artifact.
const HEADER_LEN: usize = MAGIC.len() + 32 + 32;

/// Bits of a mode that let the group or others write.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// Why a cache directory was refused.
#[derive(Debug, Error)]
#[allow(missing_docs)] // Each variant documents itself; the fields are its message.
pub enum CacheError {
    /// The current directory is needed for a relative path.
    #[error("cannot resolve a relative path: {0}")]
    Cwd(#[source] std::io::Error),
    /// `..` could lead anywhere after the check.
    #[error("the path must not contain '..'")]
    ParentComponent,
    /// Opening or creating a component failed.
    #[error("{path}: {errno}")]
    Open { path: PathBuf, errno: Errno },
    /// A component is a symlink or not a directory.
    #[error("{path} is not a directory (symlinks are not followed)")]
    NotDirectory { path: PathBuf },
    /// A component someone else owns: they could replace what lies below it.
    #[error("{path} is owned by uid {owner}, not by qmpgate's uid {euid}{or_root}")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
        or_root: &'static str,
    },
    /// A component others can write: they could replace what lies below it.
    #[error("{path} is writable by group or others (mode {mode:04o})")]
    Writable { path: PathBuf, mode: u32 },
}

/// What an entry is for: the SHA-256 of wasmtime's compatibility hash (its version,
/// target and settings) and of the component's bytes. Names the entry's file and is
/// repeated in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `bytes` compiled by `engine`.
    pub fn new(engine: &Engine, bytes: &[u8]) -> CacheKey {
        use std::hash::{Hash, Hasher};

        /// Feeds `Hash` output to SHA-256 (the compatibility hash is only `impl Hash`).
        struct Sha(Sha256);
        impl Hasher for Sha {
            fn finish(&self) -> u64 {
                unreachable!("only used through write")
            }
            fn write(&mut self, bytes: &[u8]) {
                self.0.update(bytes);
            }
        }
        let mut hasher = Sha(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        hasher.0.update(bytes);
        CacheKey(hasher.0.finalize().into())
    }

    /// The entry's file name.
    fn file_name(&self) -> String {
        format!("{self}.cwasm")
    }
}

/// Lower-case hex, as in file names.
impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why an entry was not used (it is then removed and the plugin compiled).
#[derive(Debug, Error)]
enum EntryError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("not a regular file")]
    NotFile,
    #[error("owned by uid {0}, not by qmpgate's")]
    Owner(u32),
    #[error("writable by group or others (mode {0:04o})")]
    Writable(u32),
    #[error("not in qmpgate's cache format")]
    Format,
    #[error("made for another component or wasmtime")]
    WrongKey,
    #[error("its content does not match its digest (damaged)")]
    Damaged,
    #[error("wasmtime refused it: {0}")]
    Deserialize(String),
}

/// A checked cache directory, held open: see the module documentation.
#[derive(Debug)]
pub struct CompileCache {
    /// The directory, opened and checked once; every entry is opened relative to it,
    /// so what now lies at `path` does not matter.
    dir: OwnedFd,
    /// The path it was opened by, for messages only.
    path: PathBuf,
    /// qmpgate's effective uid, the owner every entry must have.
    euid: u32,
    /// Set when a write first fails, so that the reason is logged once, not once per
    /// plugin and reload.
    write_failed: AtomicBool,
    /// Makes temporary names unique within the process (the pid, across processes).
    next_tmp: AtomicU64,
}

impl CompileCache {
    /// Opens `path` (creating what is missing, `0700`), checking every component on
    /// the way; see the module documentation for the rules.
    pub fn open(path: &Path) -> Result<CompileCache, CacheError> {
        let euid = nix::unistd::geteuid().as_raw();
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().map_err(CacheError::Cwd)?.join(path)
        };
        let parts: Vec<&std::ffi::OsStr> = absolute
            .components()
            .filter_map(|part| match part {
                PathPart::Normal(name) => Some(Ok(name)),
                PathPart::ParentDir => Some(Err(CacheError::ParentComponent)),
                PathPart::RootDir | PathPart::CurDir | PathPart::Prefix(_) => None,
            })
            .collect::<Result<_, _>>()?;

        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut here = PathBuf::from("/");
        let mut dir =
            nix::fcntl::open("/", flags, Mode::empty()).map_err(|errno| CacheError::Open {
                path: here.clone(),
                errno,
            })?;
        check_dir(&here, &dir, euid, parts.is_empty())?;
        for (i, name) in parts.iter().enumerate() {
            here.push(name);
            let open = |errno| CacheError::Open {
                path: here.clone(),
                errno,
            };
            let next = match openat(&dir, *name, flags, Mode::empty()) {
                Err(Errno::ENOENT) => {
                    // EEXIST: someone made it first (in a sticky directory, maybe
                    // another user); whatever is there is checked below like the rest.
                    match mkdirat(&dir, *name, Mode::S_IRWXU) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(errno) => return Err(open(errno)),
                    }
                    openat(&dir, *name, flags, Mode::empty())
                }
                other => other,
            }
            .map_err(|errno| match errno {
                Errno::ENOTDIR | Errno::ELOOP => CacheError::NotDirectory { path: here.clone() },
                errno => open(errno),
            })?;
            check_dir(&here, &next, euid, i + 1 == parts.len())?;
            dir = next;
        }
        Ok(CompileCache {
            dir,
            path: absolute,
            euid,
            write_failed: AtomicBool::new(false),
            next_tmp: AtomicU64::new(0),
        })
    }

    /// The entry for `key`, checked and deserialized; `None` if there is none or it
    /// fails a check (then the reason is logged and the entry removed, so that the
    /// caller's [`CompileCache::store`] replaces it).
    pub fn load(&self, engine: &Engine, key: &CacheKey) -> Option<Component> {
        let name = key.file_name();
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let file = match openat(&self.dir, name.as_str(), flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return None,
            Err(errno) => {
                self.reject(&name, &EntryError::Read(errno.into()));
                return None;
            }
        };
        match self.read_entry(engine, key, file) {
            Ok(component) => Some(component),
            Err(e) => {
                self.reject(&name, &e);
                None
            }
        }
    }

    fn read_entry(
        &self,
        engine: &Engine,
        key: &CacheKey,
        mut file: File,
    ) -> Result<Component, EntryError> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(EntryError::Read)?;
        if !meta.file_type().is_file() {
            return Err(EntryError::NotFile);
        }
        if meta.uid() != self.euid {
            return Err(EntryError::Owner(meta.uid()));
        }
        if meta.mode() & WRITABLE_BY_OTHERS != 0 {
            return Err(EntryError::Writable(meta.mode() & 0o7777));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(EntryError::Read)?;
        let artifact = verify(&bytes, key)?;
        // SAFETY: wasmtime runs deserialized code as it is. These bytes were read once,
        // through the fd of a file in the directory that `open` checked along its whole
        // path and holds (only qmpgate's uid and root can write in it); the file is
        // qmpgate's and writable by nobody else; its header names this component and
        // this wasmtime, and its digest matches the bytes handed over here.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, artifact) };
        component.map_err(|e| EntryError::Deserialize(format!("{e:#}")))
    }

    /// Logs why the entry `name` is not used and removes it.
    fn reject(&self, name: &str, reason: &EntryError) {
        tracing::warn!(
            dir = %self.path.display(),
            entry = name,
            reason = %reason,
            "ignoring plugin cache entry; compiling the plugin instead"
        );
        let _ = unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir);
    }

    /// Writes `component`'s entry for `key`: created `0600` under a temporary name,
    /// then renamed into place. A failure is logged (the first time) and otherwise
    /// harmless: the plugin is compiled again next time.
    pub fn store(&self, key: &CacheKey, component: &Component) {
        let name = key.file_name();
        let tmp = format!(
            "{name}.tmp{}-{}",
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        );
        let written = component
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
            .and_then(|artifact| self.write_new(&tmp, &encode(key, &artifact)))
            .and_then(|()| {
                renameat(&self.dir, tmp.as_str(), &self.dir, name.as_str()).map_err(Into::into)
            });
        if let Err(e) = written {
            let _ = unlinkat(&self.dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            if !self.write_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    dir = %self.path.display(),
                    entry = name,
                    error = %e,
                    "cannot write to the plugin cache; plugins will be compiled again next time"
                );
            }
        }
    }

    /// Creates `name` (which must not exist), private to qmpgate's uid, holding `bytes`.
    fn write_new(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.dir, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)?;
        File::from(fd).write_all(bytes)
    }
}

/// Checks one opened component of the cache path (`last`: the cache directory).
fn check_dir(path: &Path, fd: &impl AsFd, euid: u32, last: bool) -> Result<(), CacheError> {
    let stat = fstat(fd).map_err(|errno| CacheError::Open {
        path: path.to_path_buf(),
        errno,
    })?;
    check_stat(stat.st_mode as u32, stat.st_uid, euid, last).map_err(|refusal| refusal.at(path))
}

/// Why a component fails, before it is given its path.
#[derive(Debug, PartialEq)]
enum Refusal {
    NotDirectory,
    Owner { owner: u32, root_allowed: bool },
    Writable { mode: u32 },
}

impl Refusal {
    fn at(self, path: &Path) -> CacheError {
        let path = path.to_path_buf();
        match self {
            Refusal::NotDirectory => CacheError::NotDirectory { path },
            Refusal::Owner {
                owner,
                root_allowed,
            } => CacheError::Owner {
                path,
                owner,
                euid: nix::unistd::geteuid().as_raw(),
                or_root: if root_allowed { " or root" } else { "" },
            },
            Refusal::Writable { mode } => CacheError::Writable { path, mode },
        }
    }
}

/// The rule for one component: a directory owned by `euid` (or, above the cache
/// directory, by root), writable by nobody else; above the cache, a root-owned sticky
/// directory (`/tmp`) may be writable by all, since nobody else can rename or delete
/// what lies in it.
fn check_stat(mode: u32, owner: u32, euid: u32, last: bool) -> Result<(), Refusal> {
    if mode & SFlag::S_IFMT.bits() != SFlag::S_IFDIR.bits() {
        return Err(Refusal::NotDirectory);
    }
    if owner != euid && (last || owner != 0) {
        return Err(Refusal::Owner {
            owner,
            root_allowed: !last,
        });
    }
    let sticky_root = !last && owner == 0 && mode & Mode::S_ISVTX.bits() != 0;
    if mode & WRITABLE_BY_OTHERS != 0 && !sticky_root {
        return Err(Refusal::Writable {
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// An entry: the header, then the artifact.
fn encode(key: &CacheKey, artifact: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(HEADER_LEN + artifact.len());
    entry.extend_from_slice(MAGIC);
    entry.extend_from_slice(&key.0);
    entry.extend_from_slice(&Sha256::digest(artifact));
    entry.extend_from_slice(artifact);
    entry
}

/// The artifact of `entry`, if its header is for `key` and matches its content.
fn verify<'a>(entry: &'a [u8], key: &CacheKey) -> Result<&'a [u8], EntryError> {
    if entry.len() < HEADER_LEN || !entry.starts_with(MAGIC) {
        return Err(EntryError::Format);
    }
    let (header, artifact) = entry.split_at(HEADER_LEN);
    let (entry_key, digest) = header[MAGIC.len()..].split_at(32);
    if entry_key != key.0 {
        return Err(EntryError::WrongKey);
    }
    if digest != Sha256::digest(artifact).as_slice() {
        return Err(EntryError::Damaged);
    }
    Ok(artifact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The smallest component: a header and nothing else; compiles in microseconds.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\x00\x01\x00";

    #[test]
    fn the_rule_for_each_component() {
        let me = 1000;
        let dir = SFlag::S_IFDIR.bits();
        // The cache directory: ours, written by nobody else.
        assert_eq!(check_stat(dir | 0o700, me, me, true), Ok(()));
        assert_eq!(check_stat(dir | 0o755, me, me, true), Ok(()));
        assert_eq!(
            check_stat(dir | 0o770, me, me, true),
            Err(Refusal::Writable { mode: 0o770 })
        );
        assert_eq!(
            check_stat(dir | 0o700, 0, me, true),
            Err(Refusal::Owner {
                owner: 0,
                root_allowed: false
            })
        );
        // Sticky does not make a shared directory a private cache.
        assert_eq!(
            check_stat(dir | 0o1777, 0, 0, true),
            Err(Refusal::Writable { mode: 0o1777 })
        );
        // Above it: ours or root's; /tmp (root, sticky) but no other writable one.
        assert_eq!(check_stat(dir | 0o755, 0, me, false), Ok(()));
        assert_eq!(check_stat(dir | 0o1777, 0, me, false), Ok(()));
        assert_eq!(
            check_stat(dir | 0o777, 0, me, false),
            Err(Refusal::Writable { mode: 0o777 })
        );
        assert_eq!(
            check_stat(dir | 0o1777, me, me, false),
            Err(Refusal::Writable { mode: 0o1777 })
        );
        assert_eq!(
            check_stat(dir | 0o755, 65534, me, false),
            Err(Refusal::Owner {
                owner: 65534,
                root_allowed: true
            })
        );
        assert_eq!(
            check_stat(SFlag::S_IFLNK.bits() | 0o777, me, me, false),
            Err(Refusal::NotDirectory)
        );
    }

    fn private_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn opening_creates_the_directory_privately_and_refuses_symlinks_and_dotdot() {
        let top = private_tempdir();
        let path = top.path().join("a/b");
        CompileCache::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let link = top.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = CompileCache::open(&link).unwrap_err();
        assert!(matches!(e, CacheError::NotDirectory { .. }), "{e}");
        let e = CompileCache::open(&link.join("c")).unwrap_err();
        assert!(matches!(e, CacheError::NotDirectory { .. }), "{e}");
        assert!(!path.join("c").exists(), "nothing created behind a symlink");
        let e = CompileCache::open(&top.path().join("a/../a/b")).unwrap_err();
        assert!(matches!(e, CacheError::ParentComponent), "{e}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = CompileCache::open(&path).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is writable by group or others (mode 0770)"),
            "{e}"
        );
        // An open parent: refused before anything is created in it.
        std::fs::set_permissions(top.path().join("a"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let e = CompileCache::open(&top.path().join("a/new")).unwrap_err();
        assert!(matches!(e, CacheError::Writable { .. }), "{e}");
        assert!(!top.path().join("a/new").exists());
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_removed() {
        let engine = Engine::default();
        let top = private_tempdir();
        let cache = CompileCache::open(top.path()).unwrap();
        let key = CacheKey::new(&engine, EMPTY_COMPONENT);
        assert!(cache.load(&engine, &key).is_none());
        let component = Component::new(&engine, EMPTY_COMPONENT).unwrap();
        cache.store(&key, &component);
        let path = top.path().join(key.file_name());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(cache.load(&engine, &key).is_some());
        let names: Vec<_> = std::fs::read_dir(top.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");

        // Damaged: the last byte flipped.
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(verify(&bad, &key), Err(EntryError::Damaged)));
        assert!(cache.load(&engine, &key).is_none());
        assert!(!path.exists(), "a bad entry is removed");

        // Another key's entry under this name.
        let other = CacheKey([7; 32]);
        assert!(matches!(verify(&good, &other), Err(EntryError::WrongKey)));
        // A bare artifact (an older qmpgate's entry).
        assert!(matches!(
            verify(&good[HEADER_LEN..], &key),
            Err(EntryError::Format)
        ));
        // A good entry others may write.
        std::fs::write(&path, &good).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(cache.load(&engine, &key).is_none());
    }

    #[test]
    fn the_held_directory_is_used_whatever_is_at_its_path_later() {
        let engine = Engine::default();
        let top = private_tempdir();
        let path = top.path().join("cache");
        let cache = CompileCache::open(&path).unwrap();
        std::fs::rename(&path, top.path().join("moved")).unwrap();
        std::fs::create_dir(&path).unwrap();
        let key = CacheKey::new(&engine, EMPTY_COMPONENT);
        cache.store(&key, &Component::new(&engine, EMPTY_COMPONENT).unwrap());
        assert!(top.path().join("moved").join(key.file_name()).exists());
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
    }
}
