//! qmpgate's own log: the `QMPGATE_LOG` filter, text or JSON lines, written to
//! stderr from a thread of its own.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event; colour only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`), for
    /// log collectors.
    Json,
}

/// The filter when `QMPGATE_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info";

/// Log lines held for a slow stderr before new ones are dropped: with plugin
/// messages cut at [`qmpgate_plugin_host::LOG_MESSAGE_MAX`], a few MiB at most.
pub const LOG_BUFFER_LINES: usize = 1024;

/// The wasm compiler's crates: at `debug` they write tens of thousands of lines
/// per plugin compiled, which drown qmpgate's own. They stay at `warn` unless the
/// filter names them (`QMPGATE_LOG=debug,cranelift_codegen=debug`).
const COMPILER_TARGETS: &[&str] = &[
    "cranelift",
    "cranelift_codegen",
    "cranelift_frontend",
    "cranelift_entity",
    "regalloc2",
    "wasmtime_internal_cranelift",
    "wasmtime_cranelift",
    "wasmtime",
    "wasmtime_environ",
    "wasmtime_internal_environ",
];

/// The filter for a `QMPGATE_LOG` value: the user's directives, plus `warn` for
/// each compiler crate the value does not mention.
pub fn filter(spec: Option<&str>) -> String {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty());
    let mut directives = vec![spec.unwrap_or(DEFAULT_FILTER).to_string()];
    let named: Vec<&str> = spec
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter_map(|d| d.split(['=', '[']).next())
        .map(str::trim)
        .collect();
    for target in COMPILER_TARGETS {
        if !named
            .iter()
            .any(|n| n == target || n.starts_with(&format!("{target}::")))
        {
            directives.push(format!("{target}=warn"));
        }
    }
    directives.join(",")
}

/// Installs the global subscriber; log lines are written until the guard drops.
/// A bad `QMPGATE_LOG` is reported on stderr and the default filter used.
pub fn init(format: LogFormat) -> WorkerGuard {
    // A reader that stalls (a full pipe) costs dropped lines, never a stalled
    // session or plugin thread.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("qmpgate-log")
        .finish(std::io::stderr());
    let spec = std::env::var("QMPGATE_LOG").ok();
    let filter = EnvFilter::try_new(filter(spec.as_deref())).unwrap_or_else(|e| {
        eprintln!("qmpgate: QMPGATE_LOG: {e}; logging at '{DEFAULT_FILTER}'");
        EnvFilter::new(filter(None))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().with_current_span(false).init(),
        // Colour codes are for a terminal, not for a file or the journal.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    guard
}

#[cfg(test)]
mod tests {
    use super::filter;

    #[test]
    fn the_compiler_is_quiet_unless_named() {
        let f = filter(Some("debug"));
        assert!(f.starts_with("debug,"), "{f}");
        assert!(f.contains(",cranelift_codegen=warn"), "{f}");
        let f = filter(Some("debug,cranelift_codegen=trace"));
        assert!(!f.contains("cranelift_codegen=warn"), "{f}");
        assert!(f.contains("wasmtime=warn"), "{f}");
        let f = filter(Some("wasmtime::runtime=debug"));
        assert!(!f.contains(",wasmtime=warn"), "{f}");
        assert_eq!(filter(None).split(',').next(), Some("info"));
        assert_eq!(filter(Some("  ")).split(',').next(), Some("info"));
    }
}
