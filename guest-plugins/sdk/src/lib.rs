//! Write qmpgate plugins in Rust.
//!
//! A plugin is a type that implements [`Plugin`], exported by putting
//! [`#[plugin]`](plugin) on the `impl` block. Every hook has a default that lets
//! traffic through, so a plugin implements only what it cares about, and the host
//! calls only the hooks the block defines (the attribute tells it which: a hook
//! left out costs nothing). Its configuration is a serde type that the SDK parses
//! from the JSON the host hands over, with the parse error shown to the operator
//! at load time. Plugins built with this SDK speak `qmpgate:plugin@0.2.0`.
//!
//! ```ignore
//! use qmpgate_plugin_sdk::{plugin, Client, Command, HmpLine, Plugin, QmpError, Verdict};
//!
//! #[derive(serde::Deserialize, Default)]
//! struct Config { deny: Vec<String> }
//!
//! struct DenyList(Config);
//!
//! #[plugin]
//! impl Plugin for DenyList {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(Self(config)) }
//!     fn on_command(&mut self, _: &Client, command: &Command, _: Option<&HmpLine>) -> Verdict {
//!         if self.0.deny.contains(&command.name) {
//!             return Verdict::Deny(QmpError::generic(format!("{} is denied", command.name)));
//!         }
//!         Verdict::Forward
//!     }
//! }
//! ```
//!
//! Layout:
//! - [`Plugin`]: the trait with default hooks;
//! - [`plugin`]: the attribute that exports a type and declares its hooks;
//! - [`log`]: the host's log, plus `info!`-style macros; records of the `log` crate
//!   (from the plugin or its libraries) are forwarded there too;
//! - [`audit`]: emit one structured audit record;
//! - [`command_schema`]: QEMU's schema of a command, for decisions by type;
//! - [`bindings`]: the raw WIT bindings, for what the trait does not cover.

#![forbid(unsafe_code)]

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/plugin.wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_guest",
        default_bindings_module: "qmpgate_plugin_sdk::bindings",
        additional_derives: [PartialEq],
    });
}

use std::sync::{Mutex, Once};

pub use bindings::qmpgate::plugin::host::Level;
pub use bindings::qmpgate::plugin::types::{
    Client, Command, Decision, Event, EventVerdict, HmpLine, HmpReading, HmpTranslation, Hooks,
    Peer, Protocol, QmpError, Response, ResponseVerdict, SchemaLookup, TlsIdentity, UnixPeer,
    Verdict,
};
pub use qmpgate_plugin_sdk_macros::plugin;

impl QmpError {
    /// An error of class `GenericError`, the class QEMU uses for most failures.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError".into(),
            desc: desc.into(),
        }
    }
}

impl Command {
    /// The `arguments` parsed as JSON; `Null` if the host sent something unparsable
    /// (it never does: the host validates arguments before any plugin sees them).
    pub fn arguments_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.arguments).unwrap_or(serde_json::Value::Null)
    }
}

/// A qmpgate plugin. Each hook's default lets the traffic through unchanged.
pub trait Plugin: Sized + Send + 'static {
    /// The plugin's configuration, parsed from the JSON the host hands over
    /// (`{}` when the operator configured nothing).
    type Config: serde::de::DeserializeOwned;

    /// Build the plugin from its configuration. An error refuses the load and is
    /// shown to the operator.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// A client connected; an error closes its connection with that error.
    fn on_connect(&mut self, _client: &Client) -> Result<(), QmpError> {
        Ok(())
    }

    /// A client sent a command. `hmp` is set when the command came from HMP
    /// (`command` is then the line's QMP reading, and `hmp.canonical` the line
    /// QEMU runs if the command is forwarded).
    fn on_command(
        &mut self,
        _client: &Client,
        _command: &Command,
        _hmp: Option<&HmpLine>,
    ) -> Verdict {
        Verdict::Forward
    }

    /// The chain decided about `command` (every plugin is told, in order); for
    /// audit. `hmp` is set when the command came from HMP.
    fn on_decision(
        &mut self,
        _client: &Client,
        _command: &Command,
        _hmp: Option<&HmpLine>,
        _decision: &Decision,
    ) {
    }

    /// QEMU answered `command`.
    fn on_response(
        &mut self,
        _client: &Client,
        _command: &Command,
        _response: &Response,
    ) -> ResponseVerdict {
        ResponseVerdict::Deliver
    }

    /// QEMU raised an event; called once per negotiated client.
    fn on_event(&mut self, _client: &Client, _event: &Event) -> EventVerdict {
        EventVerdict::Deliver
    }

    /// A client's connection ended; drop what the plugin keeps about it.
    fn on_disconnect(&mut self, _client: &Client) {}

    /// Interpret an HMP command line; only HMP-parsing plugins override this.
    fn translate_hmp(&mut self, _line: &str) -> HmpTranslation {
        HmpTranslation::NotHandled
    }
}

/// The host's log. Messages are labelled with the plugin's name by the host.
pub mod log {
    pub use crate::bindings::qmpgate::plugin::host::Level;

    /// Write one message to the gateway's log.
    pub fn log(level: Level, message: &str) {
        crate::bindings::qmpgate::plugin::host::log(level, message);
    }

    /// Sends records of the `log` crate to the host's log (installed by the SDK).
    pub(crate) struct Bridge;

    impl ::log::Log for Bridge {
        fn enabled(&self, _: &::log::Metadata) -> bool {
            true
        }

        fn log(&self, record: &::log::Record) {
            let level = match record.level() {
                ::log::Level::Error => Level::Error,
                ::log::Level::Warn => Level::Warn,
                ::log::Level::Info => Level::Info,
                ::log::Level::Debug => Level::Debug,
                ::log::Level::Trace => Level::Trace,
            };
            log(level, &format!("{}: {}", record.target(), record.args()));
        }

        fn flush(&self) {}
    }

    /// `info!("...", args)`: log at info level.
    #[macro_export]
    macro_rules! info {
        ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, &format!($($arg)*)) };
    }
    /// `warn!("...", args)`: log at warn level.
    #[macro_export]
    macro_rules! warn {
        ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warn, &format!($($arg)*)) };
    }
    /// `debug!("...", args)`: log at debug level.
    #[macro_export]
    macro_rules! debug {
        ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Debug, &format!($($arg)*)) };
    }
}

/// Emit one audit record (a JSON object). The host sets time, plugin name,
/// upstream and client.
pub fn audit(record: &serde_json::Value) {
    bindings::qmpgate::plugin::host::audit(&record.to_string());
}

/// What the host knows of a command's schema ([`command_schema`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    /// QEMU's schema of the command (see `command-schema` in the WIT for its
    /// shape).
    Found(serde_json::Value),
    /// QEMU has no such command (HMP-only commands, `hmp:NAME`, never are QMP
    /// commands).
    NoSuchCommand,
    /// The host cannot say (QEMU gave no schema, or in `new`): treat it as
    /// unknown, never as harmless.
    Unknown,
}

/// QEMU's schema of command `name` on the upstream the current hook is about.
pub fn command_schema(name: &str) -> Schema {
    use bindings::qmpgate::plugin::types::SchemaLookup;
    match bindings::qmpgate::plugin::host::command_schema(name) {
        SchemaLookup::Found(text) => match serde_json::from_str(&text) {
            Ok(value) => Schema::Found(value),
            Err(_) => Schema::Unknown,
        },
        SchemaLookup::NoSuchCommand => Schema::NoSuchCommand,
        SchemaLookup::Unknown => Schema::Unknown,
    }
}

/// Holds the plugin instance between hook calls. Components are single-threaded;
/// the mutex only satisfies `static`'s `Sync` bound.
#[doc(hidden)]
pub struct Slot<P>(Mutex<Option<P>>);

impl<P: Plugin> Slot<P> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        Self(Mutex::new(None))
    }

    #[doc(hidden)]
    pub fn init(&self, config: String) -> Result<(), String> {
        static PANIC_HOOK: Once = Once::new();
        PANIC_HOOK.call_once(|| {
            // Libraries that log through the `log` facade reach the host's log too.
            if ::log::set_logger(&log::Bridge).is_ok() {
                ::log::set_max_level(::log::LevelFilter::Debug);
            }
            // Forward the panic message: after the panic the instance traps and the host
            // only sees "unreachable", which tells an author nothing.
            std::panic::set_hook(Box::new(|info| {
                log::log(Level::Error, &format!("plugin panicked: {info}"));
            }));
        });
        let text = if config.trim().is_empty() {
            "{}"
        } else {
            config.as_str()
        };
        let parsed: P::Config =
            serde_json::from_str(text).map_err(|e| format!("invalid plugin configuration: {e}"))?;
        let plugin = P::new(parsed)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(plugin);
        Ok(())
    }

    #[doc(hidden)]
    pub fn with<R>(&self, f: impl FnOnce(&mut P) -> R) -> R {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let plugin = guard
            .as_mut()
            .expect("qmpgate called a hook before init succeeded");
        f(plugin)
    }
}

impl<P: Plugin> Default for Slot<P> {
    fn default() -> Self {
        Self::new()
    }
}

/// The hook flag named after a trait method (used by [`__export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __hook {
    (on_connect) => {
        $crate::Hooks::ON_CONNECT
    };
    (on_command) => {
        $crate::Hooks::ON_COMMAND
    };
    (on_decision) => {
        $crate::Hooks::ON_DECISION
    };
    (on_response) => {
        $crate::Hooks::ON_RESPONSE
    };
    (on_event) => {
        $crate::Hooks::ON_EVENT
    };
    (on_disconnect) => {
        $crate::Hooks::ON_DISCONNECT
    };
    (translate_hmp) => {
        $crate::Hooks::TRANSLATE_HMP
    };
}

/// Registers `$ty` (a [`Plugin`]) as this component's exports, implementing the
/// listed hooks. Written by [`plugin`]; not for direct use.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($ty:ty ; $($hook:ident),*) => {
        const _: () = {
            use $crate::bindings::exports::qmpgate::plugin::guest as __guest;
            static __SLOT: $crate::Slot<$ty> = $crate::Slot::new();
            struct __Exports;
            impl __guest::Guest for __Exports {
                fn init(config: String) -> Result<$crate::Hooks, String> {
                    __SLOT.init(config)?;
                    Ok($crate::Hooks::empty() $(| $crate::__hook!($hook))*)
                }
                fn on_connect(client: $crate::Client) -> Result<(), $crate::QmpError> {
                    __SLOT.with(|p| $crate::Plugin::on_connect(p, &client))
                }
                fn on_command(
                    client: $crate::Client,
                    command: $crate::Command,
                    hmp: Option<$crate::HmpLine>,
                ) -> $crate::Verdict {
                    __SLOT.with(|p| $crate::Plugin::on_command(p, &client, &command, hmp.as_ref()))
                }
                fn on_decision(
                    client: $crate::Client,
                    command: $crate::Command,
                    hmp: Option<$crate::HmpLine>,
                    decision: $crate::Decision,
                ) {
                    __SLOT.with(|p| {
                        $crate::Plugin::on_decision(p, &client, &command, hmp.as_ref(), &decision)
                    })
                }
                fn on_response(
                    client: $crate::Client,
                    command: $crate::Command,
                    response: $crate::Response,
                ) -> $crate::ResponseVerdict {
                    __SLOT.with(|p| $crate::Plugin::on_response(p, &client, &command, &response))
                }
                fn on_event(client: $crate::Client, event: $crate::Event) -> $crate::EventVerdict {
                    __SLOT.with(|p| $crate::Plugin::on_event(p, &client, &event))
                }
                fn on_disconnect(client: $crate::Client) {
                    __SLOT.with(|p| $crate::Plugin::on_disconnect(p, &client))
                }
                fn translate_hmp(line: String) -> $crate::HmpTranslation {
                    __SLOT.with(|p| $crate::Plugin::translate_hmp(p, &line))
                }
            }
            $crate::bindings::__export_guest!(__Exports with_types_in $crate::bindings);
        };
    };
}
