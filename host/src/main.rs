//! The `qmpgate` command line.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use qmpgate::control::config::{self, FileConfig, Overrides};
use qmpgate::gateway::{Chains, Gateway, SHUTDOWN_GRACE, Settings};
use qmpgate::io::FdTable;
use qmpgate::plugin::Runtime;
use qmpgate::session::{Admission, DEFAULT_WRITE_TIMEOUT, SessionLimits};
use qmpgate::upstream::{self, Outcome};

/// A sandboxed gateway for the QEMU monitor.
///
/// qmpgate sits between QMP clients and QEMU's monitor socket. Many clients may
/// connect at once; every command passes a chain of WebAssembly policy plugins
/// before QEMU sees it. Sockets are given in QEMU's -chardev syntax, e.g.
///
///   socket,id=qmp,path=/run/vm1/qmp.sock,server=on,wait=off
///   socket,id=qmp,host=127.0.0.1,port=4444,server=on
///   socket,id=qmp,fd=3,server=on   (a socket inherited from the parent)
///   socket,id=qmp,systemd=qmp      (systemd socket activation, by its
///                                   FileDescriptorName=)
///
/// Examples:
///
///   qmpgate --upstream socket,id=qemu,path=/run/vm1/qmp.sock \
///       --listen socket,id=qmp,path=/run/vm1/gate.sock,server=on
///   qmpgate run --listen socket,id=qmp,path=vm.sock,server=on \
///       -- qemu-system-x86_64 -M none
#[derive(Debug, Parser)]
#[command(
    verbatim_doc_comment,
    name = "qmpgate",
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        "\nplugin contracts: qmpgate:plugin@0.2.0, qmpgate:plugin@0.1.0"
    ),
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    gateway: GatewayArgs,
    /// How log lines on stderr are written: text (colour only on a terminal), or
    /// json (one object per line). What is logged is set by QMPGATE_LOG (e.g.
    /// info, debug, qmpgate::session=debug).
    #[arg(
        long,
        value_name = "FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormatArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // Parsed once at start-up; boxing buys nothing.
enum Command {
    /// Start QEMU on a monitor socket qmpgate creates, connect to it once, and gate it.
    ///
    /// Example: qmpgate run --listen socket,id=qmp,path=vm.sock,server=on -- qemu-system-x86_64 -M none
    Run {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// Run QEMU as this user (name or uid), with its primary and supplementary
        /// groups, so that a policy gap is not a gap with qmpgate's privileges.
        #[arg(long, value_name = "USER")]
        runas: Option<String>,
        /// Kill QEMU when its monitor link is lost or stops answering (a QEMU nobody
        /// can manage any more); by default it runs on and qmpgate reports the loss.
        #[arg(long)]
        kill_qemu_on_link_loss: bool,
        /// QEMU's command line; qmpgate appends -chardev/-mon options for its monitor.
        #[arg(last = true, required = true, value_name = "QEMU")]
        qemu: Vec<String>,
    },
    /// Tools for plugin authors.
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// The built-in policy's rules: what each profile allows, and whether a QEMU's
    /// schema is covered.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Print a shell's completion script for qmpgate.
    ///
    /// Where each shell finds it, for every user (`make install` puts it there, under
    /// its PREFIX) or for one:
    ///
    ///   bash: /usr/share/bash-completion/completions/qmpgate
    ///         ~/.local/share/bash-completion/completions/qmpgate
    ///   zsh:  /usr/share/zsh/site-functions/_qmpgate
    ///         _qmpgate in any folder of $fpath
    ///   fish: /usr/share/fish/vendor_completions.d/qmpgate.fish
    ///         ~/.config/fish/completions/qmpgate.fish
    #[command(
        verbatim_doc_comment,
        about = "Print a shell's completion script for qmpgate"
    )]
    Completions {
        /// The shell the script is for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print qmpgate's manual page, or write one page per subcommand into a folder.
    ///
    /// With --out DIR: qmpgate.1, qmpgate-run.1, qmpgate-policy-show.1, ... (the
    /// folder is created if missing). Read one with `man -l qmpgate.1`.
    Man {
        /// Write every page into this folder instead of printing the main page.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Print what a profile allows (each command, argument and variant, with the
    /// reason it is harmless), then what the table names and refuses.
    Show {
        /// safe or readonly.
        #[arg(long, default_value = "safe")]
        profile: String,
        /// Print Markdown tables (as in the README).
        #[arg(long)]
        markdown: bool,
    },
    /// Check a QEMU's QMP schema against the table: every command and every union
    /// variant of an allowed command should be allowed or refused by name. Exits 1
    /// if something is unclassified (it is refused all the same).
    ///
    /// Example: get the schema with {"execute": "query-qmp-schema"} and save the reply.
    Check {
        /// The reply to query-qmp-schema (or its return value), as JSON.
        #[arg(long, value_name = "FILE")]
        schema: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PluginAction {
    /// Run a plugin's hooks, or a whole chain's, over a transcript on stdin and print
    /// the verdicts.
    ///
    /// Each stdin line is one JSON object: a QMP command ({"execute": ..., "arguments": ...}),
    /// an HMP line ({"hmp": "info status"}), or an event ({"event": "STOP", "data": {...}}).
    /// Each output line is the input with the verdict.
    ///
    /// Examples:
    ///   qmpgate plugin test target/wasm32-wasip2/release/my_plugin.wasm --config my.toml
    ///   qmpgate plugin test qmp-policy --config readonly.toml
    ///   qmpgate plugin test --chain --plugin my=my_plugin.wasm --profile safe
    #[command(verbatim_doc_comment)]
    Test {
        /// The plugin: a component (.wasm) or a built-in's name (hmp, qmp-policy,
        /// audit; write ./hmp for a file of that name).
        #[arg(
            value_name = "PLUGIN",
            required_unless_present = "chain",
            conflicts_with = "chain"
        )]
        component: Option<PathBuf>,
        /// The plugin's configuration: a JSON file, or a TOML file (by extension).
        #[arg(long, value_name = "FILE", conflicts_with = "chain")]
        config: Option<PathBuf>,
        /// Run the chain the gateway would run with the options below (the
        /// built-in hmp first, the configured plugins, the built-in policy last).
        #[arg(long)]
        chain: bool,
        /// With --chain: the gateway's configuration file (its [[plugin]] entries).
        #[arg(long, value_name = "FILE", requires = "chain")]
        gateway_config: Option<PathBuf>,
        /// With --chain: a plugin, as for the gateway (repeatable).
        #[arg(long = "plugin", value_name = "NAME=PATH", requires = "chain")]
        plugins: Vec<String>,
        /// With --chain: a plugin's configuration, as for the gateway (repeatable).
        #[arg(long = "plugin-config", value_name = "NAME=FILE", requires = "chain")]
        plugin_configs: Vec<String>,
        /// With --chain: the built-in policy's profile (safe, readonly, permissive, libvirt).
        #[arg(long, requires = "chain")]
        profile: Option<String>,
        /// With --chain: leave the built-in hmp and policy out.
        #[arg(long, requires = "chain")]
        no_default_policy: bool,
        /// The listener id the simulated client connected through.
        #[arg(long, default_value = "qmp")]
        listener: String,
        /// The simulated client's unix uid.
        #[arg(long, default_value_t = 1000)]
        uid: u32,
    },
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Define a chardev (QEMU syntax) to refer to by id from --listen or --upstream.
    #[arg(long, value_name = "SPEC")]
    chardev: Vec<String>,
    /// Accept clients on this chardev (a spec with server=on, or a chardev id). Repeatable.
    #[arg(long, value_name = "SPEC|ID")]
    listen: Vec<String>,
    /// A QEMU QMP monitor: a spec (path=, host=/port=, or fd= of a connected socket) or
    /// an id. Repeatable: each is an upstream named by its id, with its own listeners
    /// (`upstream=ID` on a listener) and policy (`profile=` or `plugins=A:B` on it).
    #[arg(long, value_name = "SPEC|ID")]
    upstream: Vec<String>,
    /// Load a plugin component (NAME=PATH). Repeatable; run in the order given.
    #[arg(long, value_name = "NAME=PATH")]
    plugin: Vec<String>,
    /// Give plugin NAME (from --plugin or the configuration file) its
    /// configuration: a JSON file, or TOML by extension. Repeatable.
    #[arg(long, value_name = "NAME=FILE")]
    plugin_config: Vec<String>,
    /// Run plugin NAME of the chain in audit mode (the built-in policy is
    /// `policy`): its refusals are logged, audited and counted, not enforced, to
    /// try a policy on live traffic. Repeatable.
    #[arg(long, value_name = "NAME")]
    audit_only: Vec<String>,
    /// Profile of the built-in policy when no plugin is configured: safe, readonly, permissive, libvirt.
    #[arg(long, value_name = "PROFILE")]
    profile: Option<String>,
    /// Run without the built-in policy when no plugin is configured (everything passes).
    #[arg(long)]
    no_default_policy: bool,
    /// Largest client message in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    max_message: Option<usize>,
    /// Deepest nesting of a client message [default: 64].
    #[arg(long, value_name = "N")]
    max_depth: Option<usize>,
    /// Directory for compiled plugins [default: $CACHE_DIRECTORY (systemd), else
    /// $XDG_CACHE_HOME/qmpgate, else $HOME/.cache/qmpgate].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile plugins at every start instead of caching them.
    #[arg(long)]
    no_cache: bool,
    /// Write plugins' audit records to this JSON-lines file.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// How long a plugin's audit call waits for its record to be written, in ms;
    /// past it (a stalled disk) the call fails and the command is refused, never
    /// run unrecorded.
    #[arg(long, value_name = "MS", default_value_t = qmpgate::plugin::AUDIT_WAIT.as_millis() as u64)]
    audit_wait_ms: u64,
    /// Serve read-only HTTP status (/healthz, /status, /metrics, /events) on this chardev.
    #[arg(long, value_name = "SPEC|ID")]
    status: Option<String>,
    /// Serve the control monitor (QMP: getfd, chardev-add, ...) on this unix chardev.
    /// With one, qmpgate may start with no upstream and keeps running when the last
    /// one goes.
    #[arg(long, value_name = "SPEC|ID")]
    control: Option<String>,
    /// How long a client waits for QEMU's answer before getting an error, in ms; 0 waits
    /// forever [default: 5000; 300000 for slow commands such as dump-guest-memory].
    #[arg(long, value_name = "MS")]
    command_timeout_ms: Option<u64>,
    /// How many recent events to keep for clients that reconnect
    /// (query-qmpgate-events, /events?since=) [default: 1000].
    #[arg(long, value_name = "N")]
    event_history: Option<usize>,
    /// Probe a quiet QEMU with query-status after this many ms with nothing
    /// outstanding; 0 never probes.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    probe_after_ms: u64,
    /// A probe unanswered for this many ms means QEMU stopped answering: the link
    /// counts as lost (QMPGATE_UPSTREAM_LOST with the reason).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    probe_timeout_ms: u64,
    /// How long connecting to QEMU's monitor, and then its QMP greeting, may take, in
    /// ms each; past it the connect fails (at start-up, chardev-add or a reconnect)
    /// saying whether QEMU accepted but never greeted (another client on its monitor).
    #[arg(long, value_name = "MS", default_value_t = upstream::DEFAULT_GREETING_TIMEOUT.as_millis() as u64)]
    greeting_timeout_ms: u64,
    /// How long QEMU may take to answer each step of the negotiation after its
    /// greeting (qmp_capabilities, query-status, query-qmp-schema), in ms; past it the
    /// connect fails, naming the step.
    #[arg(long, value_name = "MS", default_value_t = upstream::DEFAULT_NEGOTIATION_TIMEOUT.as_millis() as u64)]
    negotiation_timeout_ms: u64,
    /// How long a write to a client (QMP, HMP, control monitor, status endpoint) may
    /// stay blocked, in ms; past it the client counts as not reading and is
    /// disconnected (slow_clients).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_WRITE_TIMEOUT.as_millis() as u64)]
    write_timeout_ms: u64,
    /// Clients one listener serves at once; more are told so and closed.
    #[arg(long, value_name = "N", default_value_t = Admission::default().max_clients)]
    max_clients: usize,
    /// TLS handshakes in progress on one listener; more connections are closed.
    #[arg(long, value_name = "N", default_value_t = Admission::default().max_handshakes)]
    max_tls_handshakes: usize,
    /// How long a TLS client may take to complete its handshake, in ms.
    #[arg(long, value_name = "MS", default_value_t = Admission::default().handshake_timeout.as_millis() as u64)]
    tls_handshake_timeout_ms: u64,
    /// Fds kept for QEMU links, listeners and the control monitor: connections
    /// are refused beyond the fd limit less this.
    #[arg(long, value_name = "N", default_value_t = Admission::default().fd_reserve)]
    fd_reserve: usize,
    /// Connections the status endpoint serves at once.
    #[arg(long, value_name = "N", default_value_t = Admission::default().status_connections)]
    status_max_connections: usize,
    /// How long an HTTP client may take to send its request headers, in ms.
    #[arg(long, value_name = "MS", default_value_t = Admission::default().status_header_timeout.as_millis() as u64)]
    status_header_timeout_ms: u64,
    /// /events streams served at once.
    #[arg(long, value_name = "N", default_value_t = Admission::default().status_subscribers)]
    status_max_subscribers: usize,
}

impl GatewayArgs {
    fn admission(&self) -> Admission {
        Admission {
            max_clients: self.max_clients,
            max_handshakes: self.max_tls_handshakes,
            handshake_timeout: Duration::from_millis(self.tls_handshake_timeout_ms),
            fd_reserve: self.fd_reserve,
            status_connections: self.status_max_connections,
            status_header_timeout: Duration::from_millis(self.status_header_timeout_ms),
            status_subscribers: self.status_max_subscribers,
        }
    }

    fn liveness(&self) -> upstream::Liveness {
        upstream::Liveness {
            quiet: (self.probe_after_ms > 0).then(|| Duration::from_millis(self.probe_after_ms)),
            timeout: Duration::from_millis(self.probe_timeout_ms),
            greeting: Duration::from_millis(self.greeting_timeout_ms),
            negotiation: Duration::from_millis(self.negotiation_timeout_ms),
        }
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            chardevs: self.chardev.clone(),
            listen: self.listen.clone(),
            upstreams: self.upstream.clone(),
            plugins: self.plugin.clone(),
            plugin_configs: self.plugin_config.clone(),
            audit_only: self.audit_only.clone(),
            profile: self.profile.clone(),
            no_default_policy: self.no_default_policy,
            max_message: self.max_message,
            max_depth: self.max_depth,
            cache_dir: self.cache_dir.clone(),
            no_cache: self.no_cache,
            audit_log: self.audit_log.clone(),
            status: self.status.clone(),
            control: self.control.clone(),
            command_timeout_ms: self.command_timeout_ms,
            event_history: self.event_history,
        }
    }
}

/// `qmpgate policy show|check`.
fn policy(action: &PolicyAction) -> anyhow::Result<u8> {
    use qmpgate::plugin::policy_table::{self, Format, allowlist};
    let table = allowlist::Table::builtin();
    match action {
        PolicyAction::Show { profile, markdown } => {
            let level = match profile.as_str() {
                "safe" => allowlist::Level::Safe,
                "readonly" => allowlist::Level::Readonly,
                "permissive" => {
                    println!(
                        "Profile 'permissive' has no table: only the operator's rules decide."
                    );
                    return Ok(0);
                }
                "libvirt" => {
                    println!(
                        "Profile 'libvirt' (the VM manager's listener) has no table: it decides as \
                         'permissive', and its listener passes fds (fds=pass) and sets no deadline \
                         (timeout-ms=0) unless the listener's spec says otherwise."
                    );
                    return Ok(0);
                }
                other => {
                    anyhow::bail!(
                        "no profile '{other}' (profiles: {})",
                        qmpgate::plugin::spec::PROFILES.join(", ")
                    )
                }
            };
            let format = if *markdown {
                Format::Markdown
            } else {
                Format::Text
            };
            print!("{}", policy_table::show(&table, level, format));
            Ok(0)
        }
        PolicyAction::Check { schema } => {
            let text = std::fs::read_to_string(schema)
                .with_context(|| format!("cannot read {}", schema.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", schema.display()))?;
            let coverage = policy_table::check(&table, &value)
                .with_context(|| schema.display().to_string())?;
            print!("{}", coverage.report());
            Ok(if coverage.complete() { 0 } else { 1 })
        }
    }
}

/// `qmpgate completions SHELL`: the script, generated from this command line's
/// definition, on stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "qmpgate", &mut script);
    std::io::stdout().write_all(&script)?;
    Ok(0)
}

/// `qmpgate man [--out DIR]`: the manual pages, rendered from this command line's
/// definition: the main page on stdout, or it and one page per subcommand in DIR.
fn man(out: Option<&Path>) -> anyhow::Result<u8> {
    // No page for `help`: each page already says what `--help` would.
    let mut cli = Cli::command().disable_help_subcommand(true);
    // Gives each subcommand its full name (qmpgate-policy-show), the page's name.
    cli.build();
    let Some(dir) = out else {
        std::io::stdout().write_all(&manual_page(cli)?.1)?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pending = vec![cli];
    while let Some(command) = pending.pop() {
        pending.extend(
            command
                .get_subcommands()
                .filter(|c| !c.is_hide_set())
                .cloned(),
        );
        let (name, page) = manual_page(command)?;
        let path = dir.join(name);
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(0)
}

/// One command's page: its file name (qmpgate-run.1) and its roff source. The
/// footer names qmpgate's version alone: the `--version` text has a second line,
/// which a `.TH` line cannot hold.
fn manual_page(command: clap::Command) -> anyhow::Result<(String, Vec<u8>)> {
    let page =
        clap_mangen::Man::new(command).source(concat!("qmpgate ", env!("CARGO_PKG_VERSION")));
    let mut roff = Vec::new();
    page.render(&mut roff)?;
    Ok((page.get_filename(), roff))
}

fn main() -> ExitCode {
    // Before anything opens a file: every fd above stderr now is one the parent
    // passed, and none may be confused with, or leak like, one of our own.
    let fds = FdTable::from_process();
    let cli = Cli::parse();
    let log_flush = qmpgate::control::logging::init(match cli.log_format {
        LogFormatArg::Text => qmpgate::control::logging::LogFormat::Text,
        LogFormatArg::Json => qmpgate::control::logging::LogFormat::Json,
    });
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qmpgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli, fds));
    // Everything logged so far is written before the final word.
    drop(log_flush);
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qmpgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, mut fds: FdTable) -> anyhow::Result<u8> {
    let signalled = stop_on_signal()?;
    // `qmpgate run`'s own options; `qemu` is `Some` only under `run`.
    let (args, qemu, runas, kill_on_loss) = match &cli.command {
        Some(Command::Run {
            gateway,
            qemu,
            runas,
            kill_qemu_on_link_loss,
        }) => (
            gateway,
            Some(qemu.clone()),
            runas.as_deref(),
            *kill_qemu_on_link_loss,
        ),
        Some(Command::Plugin {
            action:
                PluginAction::Test {
                    component,
                    config,
                    chain,
                    gateway_config,
                    plugins,
                    plugin_configs,
                    profile,
                    no_default_policy,
                    listener,
                    uid,
                },
        }) => {
            use qmpgate::control::authoring;
            let specs = if *chain {
                let file = match gateway_config {
                    Some(path) => FileConfig::load(path)?,
                    None => FileConfig::default(),
                };
                let overrides = Overrides {
                    plugins: plugins.clone(),
                    plugin_configs: plugin_configs.clone(),
                    profile: profile.clone(),
                    no_default_policy: *no_default_policy,
                    ..Overrides::default()
                };
                config::plugin_chain(file.plugins, &overrides)?
            } else {
                let component = component.as_deref().expect("clap requires it");
                vec![authoring::single(component, config.as_deref())?]
            };
            return Ok(authoring::plugin_test(specs, listener, *uid).await?);
        }
        Some(Command::Policy { action }) => return policy(action),
        Some(Command::Completions { shell }) => return completions(*shell),
        Some(Command::Man { out }) => return man(out.as_deref()),
        None => (&cli.gateway, None, None, false),
    };
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let mut overrides = args.overrides();
    // `qmpgate run`: the monitor socket now, QEMU itself only once everything that
    // can fail (configuration, plugins, sockets) has been checked.
    let prepared = match &qemu {
        Some(_) => {
            if !overrides.upstreams.is_empty() || !matches!(file.upstream, config::OneOrMany::None)
            {
                anyhow::bail!("'qmpgate run' creates the upstream itself; do not give --upstream");
            }
            let runas = runas
                .map(qmpgate::control::launcher::RunAs::lookup)
                .transpose()?;
            let argv = qemu.as_deref().unwrap_or_default();
            let prepared = (qmpgate::control::launcher::prepare(argv, &mut fds)?, runas);
            // `,,` escapes a comma inside a chardev value.
            let path = prepared.0.monitor.display().to_string().replace(',', ",,");
            overrides.upstreams = vec![format!("socket,id=qemu,path={path}")];
            Some(prepared)
        }
        None => None,
    };
    let resolved = config::resolve(file, overrides.clone())?;

    let audit = match &resolved.audit_log {
        Some(path) => Some(Arc::new(
            qmpgate::plugin::audit::AuditSink::open(
                path,
                Duration::from_millis(args.audit_wait_ms),
            )
            .with_context(|| format!("cannot open audit log {}", path.display()))?,
        )),
        None => None,
    };
    if resolved.cache_dir.is_none() && !args.no_cache {
        tracing::warn!(
            "no cache directory (neither --cache-dir, CACHE_DIRECTORY, XDG_CACHE_HOME nor HOME \
             is set): plugins are compiled at every start"
        );
    }
    let wasm = Arc::new(Runtime::new(resolved.cache_dir.clone(), audit)?);
    let mut chains = Chains::new(wasm.clone(), resolved.plugins.clone());
    // Load the default chain now, so that a plugin error is a start-up error even for
    // a gateway that gets its upstreams at run time.
    chains.get(&qmpgate::protocol::chardev::ChainSelector::Default)?;
    // And every policy an upstream or listener selects.
    for spec in resolved.upstreams.iter().chain(&resolved.listeners) {
        chains
            .get(&spec.policy)
            .with_context(|| format!("chardev '{}'", spec.id))?;
    }
    let listeners = Gateway::open_listeners(resolved.listeners.clone(), &mut fds)?;
    let settings = Settings {
        upstreams: resolved.upstreams,
        listeners,
        chains,
        limits: SessionLimits {
            max_message: resolved.max_message,
            max_depth: resolved.max_depth,
            timeouts: resolved.timeouts.clone(),
            event_history: resolved.event_history,
            liveness: args.liveness(),
            write_timeout: Duration::from_millis(args.write_timeout_ms),
            connections: Arc::new(tokio::sync::Semaphore::new(
                args.admission().connection_budget(),
            )),
            admission: args.admission(),
        },
        persistent: resolved.control.is_some(),
        keep_ended: prepared.is_some(),
    };
    // Open the status and control sockets first: their errors are start-up errors.
    let status_listener = resolved
        .status
        .as_ref()
        .map(|spec| qmpgate::io::listen(spec, &mut fds))
        .transpose()?;
    let control_listener = resolved
        .control
        .as_ref()
        .map(|spec| qmpgate::io::listen(spec, &mut fds))
        .transpose()?;
    let mut launched = match (prepared, &qemu) {
        (Some((prepared, runas)), Some(argv)) => Some(prepared.spawn(argv, runas)?),
        _ => None,
    };
    let gateway = match Gateway::start(settings, &mut fds).await {
        Ok(gateway) => gateway,
        Err(e) => {
            if let Some(launched) = &mut launched {
                // The likeliest reason is that QEMU did not start: say how it ended. The
                // link may fail a moment before QEMU's exit is visible, so wait briefly.
                let exited =
                    tokio::time::timeout(Duration::from_secs(2), launched.child.wait()).await;
                if let Ok(Ok(status)) = exited {
                    anyhow::bail!(
                        "QEMU exited at start-up ({})",
                        qmpgate::control::launcher::describe_exit(status)
                    );
                }
                let _ = launched.child.start_kill();
            }
            return Err(e.into());
        }
    };

    let hub = gateway.hub().clone();
    let reloader = qmpgate::control::reload::Reloader::spawn(
        hub.clone(),
        wasm,
        args.config.clone(),
        overrides,
    );
    for (spec, listener, role) in [
        (&resolved.status, &status_listener, "status"),
        (&resolved.control, &control_listener, "control"),
    ] {
        if let (Some(spec), Some(listener)) = (spec, listener) {
            hub.register_service(qmpgate::gateway::Service {
                id: spec.id.clone(),
                role,
                address: spec.address.to_string(),
                bound: listener.local_description(),
            });
        }
    }
    if let Some(listener) = status_listener {
        tracing::info!(address = %listener.local_description(), "status endpoint");
        hub.spawn(qmpgate::control::status::serve(listener, hub.clone()));
    }
    if let Some(listener) = control_listener {
        tracing::info!(address = %listener.local_description(), "control monitor");
        let access = resolved
            .control
            .as_ref()
            .map(|spec| spec.access.clone())
            .unwrap_or_default();
        hub.spawn(qmpgate::control::monitor::serve(
            listener,
            access,
            hub.clone(),
            reloader.clone(),
        ));
    }
    reloader.on_sighup();
    qmpgate::control::systemd::notify(&format!(
        "READY=1\nSTATUS={}",
        qmpgate::control::systemd::status_line(&hub)
    ));
    hub.spawn(qmpgate::control::systemd::report_status(
        hub.clone(),
        hub.shutdown_token(),
    ));

    let Some(mut launched) = launched else {
        return Ok(match gateway.run(signalled).await {
            Outcome::Shutdown | Outcome::QemuQuit => 0,
            Outcome::Lost(_) => 1,
        });
    };

    // `qmpgate run`: the gateway lives as long as QEMU.
    let shared = hub
        .upstream("qemu")
        .context("the launched QEMU's upstream is gone")?;
    let gateway_stop = CancellationToken::new();
    let gateway_task = tokio::spawn(gateway.run(gateway_stop.clone()));
    let status = tokio::select! {
        status = launched.child.wait() => status?,
        _ = shared.upstream.lost(), if kill_on_loss => {
            // The link also ends when QEMU quits: give an exiting QEMU a moment.
            match tokio::time::timeout(Duration::from_secs(1), launched.child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    tracing::error!("the monitor link is lost; killing QEMU (--kill-qemu-on-link-loss)");
                    launched.child.kill().await?;
                    launched.child.wait().await?
                }
            }
        }
        _ = signalled.cancelled() => {
            // Ask QEMU to quit through its monitor, so clients see its SHUTDOWN event,
            // then give it the grace period, then kill it.
            let quit = qmpgate::protocol::qmp::Command { name: "quit".into(), arguments: Default::default(), oob: false };
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, shared.upstream.execute(quit)).await;
            match tokio::time::timeout(SHUTDOWN_GRACE, launched.child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    tracing::warn!("QEMU did not quit within {SHUTDOWN_GRACE:?}; killing it");
                    launched.child.kill().await?;
                    launched.child.wait().await?
                }
            }
        }
    };
    let description = qmpgate::control::launcher::describe_exit(status);
    tracing::info!(status = %description, "QEMU exited");
    let code = qmpgate::control::launcher::exit_code(status);
    shared.registry.set_qemu_exit(description.clone());
    // Clients get the event as their sessions drain.
    shared.upstream.announce(
        "QMPGATE_QEMU_EXITED",
        serde_json::json!({ "status": description, "exit-code": code }),
    );
    gateway_stop.cancel();
    let _ = gateway_task.await;
    Ok(code.clamp(0, 255) as u8)
}

/// A host gateway holds three fds or more per VM (its monitor link, a listener, each
/// client); the usual soft limit of 1024 would cap it near 300 VMs. Raise the soft
/// limit to the hard one, as the limit's design intends for programs that need it.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
    }
}

/// Installs the SIGTERM/SIGINT handlers now (so a signal that arrives while starting
/// up is not lost or fatal) and returns a token cancelled when one arrives.
fn stop_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        qmpgate::control::systemd::notify("STOPPING=1");
        token.cancel();
    });
    Ok(stop)
}
