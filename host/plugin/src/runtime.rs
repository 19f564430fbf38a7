//! The runtime: one wasmtime engine, linker and compile cache per process.

use qmpgate_protocol::lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::audit::AuditSink;
use crate::cache::{CacheKey, CompileCache};
use crate::host::HostState;
use crate::instance::{Instance, Loaded};
use crate::stats::PluginStats;
use crate::wit;
use crate::wit::{Hooks, Pre, Version};
use crate::{EPOCH_TICK, Limits, PluginError};

/// The shared wasmtime engine, linker and compile caches (in memory, and `.cwasm`
/// files on disk). One per process: a plugin is compiled (or loaded) once, and its
/// code is shared by every chain, upstream and listener.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    /// The checked `.cwasm` directory, held open (`None`: no cache, or it was refused).
    cache: Option<CompileCache>,
    audit: Option<Arc<AuditSink>>,
    /// Components compiled (or loaded) by this process, by cache key: a plugin that
    /// many upstreams' chains use is compiled, and its code mapped, once.
    compiled: Mutex<HashMap<CacheKey, Component>>,
}

impl Runtime {
    /// Creates the engine and starts the epoch ticker thread. `cache_dir` holds
    /// precompiled plugins (`None` disables the cache); it is checked and opened here,
    /// once (see [`crate::cache`]), and a directory that fails is not used.
    pub fn new(
        cache_dir: Option<PathBuf>,
        audit: Option<Arc<AuditSink>>,
    ) -> Result<Self, PluginError> {
        let mut config = Config::new();
        // Hooks run on the caller's task (no thread hop): a call is a future (the
        // async bindings) that yields at every epoch tick, so a plugin running long
        // never holds a tokio worker for more than a tick, and is still stopped at
        // its deadline (see `Instance::instantiate`).
        config.epoch_interruption(true);
        // Plugins recurse little; a small stack turns runaway recursion into a quick trap.
        config.max_wasm_stack(512 << 10);
        let failed = |e: wasmtime::Error| PluginError::Runtime(format!("{e:#}"));
        let engine = Engine::new(&config).map_err(failed)?;

        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("qmpgate-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Runtime(format!("cannot start the epoch thread: {e}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(failed)?;
        forbid_waiting(&mut linker).map_err(failed)?;
        wit::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(failed)?;
        wit::v0_1::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(failed)?;

        let cache = cache_dir.and_then(|dir| match CompileCache::open(&dir) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e,
                    "plugin cache disabled: plugins are compiled instead"
                );
                None
            }
        });
        Ok(Runtime {
            engine,
            linker,
            cache,
            audit,
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// Opens the audit log again by its path (after logrotate moved it away), once
    /// the records queued before are written. Blocks: call it off the async
    /// workers. Without an audit log, does nothing.
    pub fn reopen_audit(&self) -> std::io::Result<()> {
        self.audit.as_ref().map_or(Ok(()), |sink| sink.reopen())
    }

    /// Drops the in-memory compile cache, so that it holds only what the current
    /// configuration uses: a reload calls this first (components in use live on in
    /// their instances; the `.cwasm` files make reloading them cheap).
    pub fn forget_compiled(&self) {
        lock::mutex(&self.compiled).clear();
    }

    /// Loads a plugin: compiles (or loads from cache), checks the WIT version and
    /// links it. [`crate::PluginChain::start`] then instantiates it and calls `init`.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        config: &Value,
        limits: Limits,
    ) -> Result<Loaded, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
            name: name.into(),
            path: path.to_path_buf(),
            source,
        })?;
        self.load_bytes(name, &bytes, config, limits)
    }

    /// As [`Runtime::load`], from bytes in memory.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        config: &Value,
        limits: Limits,
    ) -> Result<Loaded, PluginError> {
        let started = Instant::now();
        let component = self.compile(name, bytes)?;
        let version = check_version(name, &component, &self.engine)?;
        let link_error = |e: wasmtime::Error| PluginError::Link {
            name: name.into(),
            reason: format!("{e:#}"),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(link_error)?;
        let pre = match version {
            Version::V0_1 => Pre::V0_1(wit::v0_1::PluginPre::new(pre).map_err(link_error)?),
            Version::V0_2 => Pre::V0_2(wit::PluginPre::new(pre).map_err(link_error)?),
        };
        tracing::debug!(
            plugin = name,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin compiled"
        );
        Ok(Loaded(Instance {
            name: name.into(),
            engine: self.engine.clone(),
            pre,
            config: config.to_string(),
            limits,
            audit: self.audit.clone(),
            live: None,
            own_faults: HashMap::new(),
            client_faults: Arc::default(),
            stats: Arc::new(PluginStats::default()),
            upstream: None,
            client: None,
            schema: None,
            // Until the first `init` says otherwise.
            hooks: Hooks::all(),
            in_call: false,
            audit_only: false,
        }))
    }

    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        let key = CacheKey::new(&self.engine, bytes);
        let compiled = || lock::mutex(&self.compiled);
        if let Some(component) = compiled().get(&key) {
            return Ok(component.clone());
        }
        let component = self.compile_uncached(name, bytes, &key)?;
        compiled().insert(key, component.clone());
        Ok(component)
    }

    fn compile_uncached(
        &self,
        name: &str,
        bytes: &[u8],
        key: &CacheKey,
    ) -> Result<Component, PluginError> {
        if let Some(component) = self.cache.as_ref().and_then(|c| c.load(&self.engine, key)) {
            return Ok(component);
        }
        if let Some(reason) = not_a_component(bytes) {
            return Err(PluginError::Compile {
                name: name.into(),
                reason: reason.into(),
            });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Compile {
            name: name.into(),
            // wasmparser's messages may hold multi-line dumps of bytes.
            reason: format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })?;
        if let Some(cache) = &self.cache {
            cache.store(key, &component);
        }
        Ok(component)
    }
}

/// The `wasi:io/poll` wasmtime-wasi implements (guests importing any 0.2.x
/// version are linked to it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// Replaces WASI's two waiting calls, `poll` and `pollable.block`, with ones that
/// never wait: what is ready is returned at once, and a call that would have to
/// wait traps. A hook cannot block its task (the epoch deadline only
/// interrupts wasm, not a host call), and a plugin has nothing to wait for: it
/// has no sockets, files or stdin, only clocks (`std::thread::sleep` traps).
fn forbid_waiting(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::StoreContextMut;
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    use wasmtime_wasi::p2::bindings::io::poll::HostPollable;

    const WAIT: &str = "plugins may not wait: a hook cannot block (wasi:io/poll)";
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    // `ready` only asks: it polls a pollable once and never waits.
    poll.func_wrap_async(
        "poll",
        |mut store: StoreContextMut<'_, HostState>, (pollables,): (Vec<Resource<DynPollable>>,)| {
            Box::new(async move {
                let table = &mut store.data_mut().table;
                let mut ready = Vec::new();
                for (index, pollable) in pollables.into_iter().enumerate() {
                    if HostPollable::ready(table, pollable).await? {
                        ready.push(u32::try_from(index)?);
                    }
                }
                if ready.is_empty() {
                    return Err(wasmtime::Error::msg(WAIT));
                }
                Ok((ready,))
            })
        },
    )?;
    poll.func_wrap_async(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, HostState>, (pollable,): (Resource<DynPollable>,)| {
            Box::new(async move {
                if !HostPollable::ready(&mut store.data_mut().table, pollable).await? {
                    return Err(wasmtime::Error::msg(WAIT));
                }
                Ok(())
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The contract version `component` was built for; a version this host does
/// not support is refused, naming both.
fn check_version(
    name: &str,
    component: &Component,
    engine: &Engine,
) -> Result<Version, PluginError> {
    let ty = component.component_type();
    let mut found = None;
    for (export, _) in ty.exports(engine) {
        if let Some(version) = Version::of_export(export) {
            return Ok(version);
        }
        if let Some(version) = export.strip_prefix("qmpgate:plugin/guest") {
            found = Some(format!("qmpgate:plugin{version}"));
        }
    }
    Err(PluginError::Version {
        name: name.into(),
        found: found
            .unwrap_or_else(|| "something else (it does not export qmpgate:plugin/guest)".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_is_compiled_once_per_process() {
        let runtime = Runtime::new(None, None).unwrap();
        let bytes = crate::builtin::POLICY;
        let first = runtime.compile("a", bytes).unwrap();
        let second = runtime.compile("b", bytes).unwrap();
        // The same compiled code, mapped once, whatever name or configuration.
        assert_eq!(first.image_range(), second.image_range());
        let other = runtime.compile("hmp", crate::builtin::HMP).unwrap();
        assert_ne!(first.image_range(), other.image_range());
        // After a reload forgets them, nothing keeps old components in memory.
        runtime.forget_compiled();
        let again = runtime.compile("a", bytes).unwrap();
        assert_ne!(first.image_range(), again.image_range());
    }
}

/// Why `bytes` is plainly not a WebAssembly component, in the words a plugin
/// author needs (before wasmtime's parser says it in terms of magic numbers).
fn not_a_component(bytes: &[u8]) -> Option<&'static str> {
    const MAGIC: &[u8] = b"\0asm";
    // The version field: 1 for a core module; a component's layer is 1.
    const CORE_MODULE: &[u8] = &[1, 0, 0, 0];
    if !bytes.starts_with(MAGIC) {
        return Some(
            "the file is not WebAssembly (it does not start with \\0asm); build the plugin with `cargo build --release --target wasm32-wasip2`",
        );
    }
    if bytes.get(4..8) == Some(CORE_MODULE) {
        return Some(
            "the file is a core WebAssembly module, not a component; build for the wasm32-wasip2 target (not wasm32-unknown-unknown or wasm32-wasip1)",
        );
    }
    None
}

#[cfg(test)]
mod header_tests {
    use super::not_a_component;

    #[test]
    fn text_files_and_core_modules_are_named_for_what_they_are() {
        assert!(
            not_a_component(b"hello\n")
                .unwrap()
                .contains("not WebAssembly")
        );
        assert!(
            not_a_component(b"\0asm\x01\0\0\0")
                .unwrap()
                .contains("core WebAssembly module")
        );
        assert_eq!(not_a_component(b"\0asm\x0d\0\x01\0"), None);
    }
}
