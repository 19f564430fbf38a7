//! One client's HMP session on a `mode=readline` listener, like QEMU's
//! `-mon mode=readline`: a banner, a `(qemu) ` prompt, one command per line.
//!
//! Every line goes through the plugin chain exactly as QMP's
//! `human-monitor-command` does (the HMP plugin says what it means in QMP terms, the
//! policy decides), and an allowed line runs in QEMU as `human-monitor-command`, so
//! the output is QEMU's own. Refusals print as `Error: ...`, as HMP errors do.
//!
//! Layout: [`serve`] is the task; lines are read with a length limit (the
//! listener's `max-message`) so a client cannot make the gateway buffer without end.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use qmpgate_plugin_host::{self as plugin, Decision};

use super::{Context, FAULTING, Verdict, faulting, run_command, write_within};
use crate::io::Stream;

const PROMPT_TEXT: &str = "(qemu) ";

/// Serves one HMP client until it leaves or the gateway stops; returns why it ended.
pub async fn serve(
    stream: Stream,
    client: plugin::Client,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> &'static str {
    let (reader, mut writer) = stream.into_split();
    if let Err(error) = ctx.chain().on_connect(&client).await {
        let _ = write_within(
            &mut writer,
            format!("Error: {}\r\n", error.desc).as_bytes(),
            ctx.limits.write_timeout,
        )
        .await;
        return "refused by a plugin";
    }
    let version = ctx.upstream.info().version;
    let qemu = &version["qemu"];
    let banner = format!(
        "QEMU {}.{}.{} monitor - type 'help' for more information\r\n",
        qemu["major"], qemu["minor"], qemu["micro"]
    );
    if write_within(
        &mut writer,
        format!("{banner}{}", PROMPT_TEXT).as_bytes(),
        ctx.limits.write_timeout,
    )
    .await
    .is_err()
    {
        return "write failed";
    }
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(ctx.limits.max_message as u64 + 1);
        let read = tokio::select! {
            _ = shutdown.cancelled() => return "gateway shutting down",
            read = limited.read_until(b'\n', &mut line) => read,
        };
        match read {
            Ok(0) | Err(_) => return "end of input",
            Ok(_) => {}
        }
        let output = if line.len() > ctx.limits.max_message {
            // Skip the rest of the over-long line before answering.
            let mut rest = Vec::new();
            while !line.ends_with(b"\n") {
                rest.clear();
                let mut limited = (&mut reader).take(64 * 1024);
                let read = tokio::select! {
                    _ = shutdown.cancelled() => return "gateway shutting down",
                    read = limited.read_until(b'\n', &mut rest) => read,
                };
                match read {
                    Ok(0) | Err(_) => return "end of input",
                    Ok(_) => line = rest.clone(),
                }
            }
            format!(
                "Error: command line exceeds the limit of {} bytes\r\n",
                ctx.limits.max_message
            )
        } else {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']).trim();
            if text.is_empty() {
                String::new()
            } else {
                ctx.metrics.commands.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => return "gateway shutting down",
                    output = run_line(&ctx, &client, text) => output,
                }
            }
        };
        let output = output.replace("\r\n", "\n").replace('\n', "\r\n");
        if faulting(&ctx, &client) {
            let _ = write_within(&mut writer, output.as_bytes(), ctx.limits.write_timeout).await;
            return FAULTING;
        }
        if write_within(
            &mut writer,
            format!("{output}{PROMPT_TEXT}").as_bytes(),
            ctx.limits.write_timeout,
        )
        .await
        .is_err()
        {
            return "write failed";
        }
    }
}

/// Decides on one line and, if allowed, runs it in QEMU; returns what to print.
async fn run_line(ctx: &Context, client: &plugin::Client, line: &str) -> String {
    // HMP lines are counted as what QEMU runs them with.
    const HMP: &str = "human-monitor-command";
    match ctx.chain().on_hmp(client, line, None).await {
        Decision::Forward(command) => {
            ctx.count_command(HMP, Verdict::Forwarded);
            let limit = ctx.timeouts.for_command(&command.name);
            let reply = run_command(&ctx.upstream, command, limit)
                .await
                .body
                .into_object();
            match (reply.get("return"), reply.get("error")) {
                (Some(Value::String(text)), _) => text.clone(),
                (Some(other), _) => format!("{other}\r\n"),
                (None, Some(error)) => format!(
                    "Error: {}\r\n",
                    error["desc"].as_str().unwrap_or("unknown error")
                ),
                (None, None) => String::new(),
            }
        }
        Decision::Deny(error) => {
            ctx.count_command(HMP, Verdict::Denied);
            ctx.metrics.denied.fetch_add(1, Ordering::Relaxed);
            format!("Error: {}\r\n", error.desc)
        }
        Decision::Reply(reply) => {
            ctx.count_command(HMP, Verdict::Answered);
            match reply {
                Value::String(text) => text,
                value => format!("{value}\r\n"),
            }
        }
    }
}
