//! Progress output for `sluice run`: a progress bar on a terminal, plain lines
//! otherwise (logs, CI), and the final summary.

use std::io::IsTerminal;

use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice_coordinator::progress::{BatchReport, FlowSummary, ProgressEvent, RunSummary};
use sluice_proto::task::{MergeCounts, Quality};
use tokio::sync::mpsc::UnboundedReceiver;

/// Prints events until the sender side is dropped.
pub async fn render_progress(mut events: UnboundedReceiver<ProgressEvent>) {
    let bar = std::io::stderr().is_terminal().then(new_bar);
    while let Some(event) = events.recv().await {
        match &bar {
            Some(bar) => draw(bar, &event),
            None => {
                if let Some(line) = line_for(&event) {
                    eprintln!("{line}");
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn draw(bar: &ProgressBar, event: &ProgressEvent) {
    match event {
        ProgressEvent::BatchStarted { flow, batch, files, bytes, .. } => {
            bar.set_prefix(format!("{flow} batch {batch}"));
            bar.set_length(*bytes);
            bar.set_position(0);
            bar.set_message(format!("{files} files"));
        }
        ProgressEvent::TaskFinished { bytes, .. } => bar.inc(*bytes),
        other => {
            if let Some(line) = line_for(other) {
                bar.println(line);
            }
        }
    }
}

fn plural(count: u64, noun: &str) -> String {
    match (count, noun.ends_with('h')) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{count} {noun}es"),
        _ => format!("{count} {noun}s"),
    }
}

/// The plain-text line for an event, if it gets one.
pub fn line_for(event: &ProgressEvent) -> Option<String> {
    Some(match event {
        ProgressEvent::BatchStarted { flow, batch, tasks, source_versions: Some((first, last)), .. } => {
            let versions =
                if first == last { format!("version {first}") } else { format!("versions {first} to {last}") };
            format!("{flow}: starting batch {batch}: source {versions} in {}", plural(*tasks as u64, "task"))
        }
        ProgressEvent::BatchStarted { flow, batch, files, bytes, tasks, resumed, source_versions: None } => {
            let how = if *resumed { "resuming" } else { "starting" };
            format!(
                "{flow}: {how} batch {batch}: {}, {} in {}",
                plural(*files, "file"),
                ByteSize(*bytes),
                plural(*tasks as u64, "task")
            )
        }
        ProgressEvent::TaskFinished { .. } | ProgressEvent::Discovered { .. } => return None,
        ProgressEvent::TaskRetried { flow, batch, message } => {
            format!("{flow}: batch {batch}: a task failed and runs again: {message}")
        }
        ProgressEvent::BatchCommitted(report) => committed_line(report),
        ProgressEvent::RewrittenFileSkipped { flow, file } => {
            format!(
                "{flow}: warning: {file} changed after it was ingested; skipped (allow_overwrites: true ingests it again)"
            )
        }
        ProgressEvent::PlannedFileVanished { flow, batch, file } => {
            format!("{flow}: warning: {file} was deleted before batch {batch} committed; it is left out")
        }
        ProgressEvent::FlowCaughtUp { flow } => format!("{flow}: caught up"),
        ProgressEvent::SchemaVersion { flow, version, origin, added, file, schema } => match (added.is_empty(), file) {
            (false, Some(file)) => format!(
                "{flow}: schema version {version}: new column(s) {} (first seen in {file}) added to the schema and the table",
                added.join(", ")
            ),
            _ => format!("{flow}: schema version {version} ({origin}): {schema}"),
        },
        ProgressEvent::RoundFailed { flow, message } => format!("{flow}: error, trying again next round: {message}"),
        ProgressEvent::FlowSkipped { flow, upstream } => {
            format!("{flow}: not run, because `{upstream}`, which it reads from, failed")
        }
        ProgressEvent::Waiting { seconds } => format!("waiting {seconds:.1}s for the next round"),
    })
}

fn committed_line(report: &BatchReport) -> String {
    let version = match report.version {
        Some(version) => format!("Delta version {version}"),
        None => "already in the table".to_string(),
    };
    let quality = report.quality.as_ref().map(quality_counts).unwrap_or_default();
    if let Some((first, last)) = report.source_versions {
        return format!(
            "{}: batch {} committed: source versions {first} to {last}, {} written{}{quality} in {:.2}s -> {version}",
            report.flow,
            report.batch,
            plural(report.rows, "row"),
            merge_counts(report.merge.as_ref()),
            report.seconds
        );
    }
    format!(
        "{}: batch {} committed: {}, {}{quality}, {} in {:.2}s -> {version}",
        report.flow,
        report.batch,
        plural(report.files, "file"),
        plural(report.rows, "row"),
        ByteSize(report.bytes),
        report.seconds
    )
}

/// ` (3 malformed, 1 unreadable file, 2 failing expectations)`: bad input
/// found, when there was any.
fn quality_counts(quality: &Quality) -> String {
    let failing: u64 = quality.expectations.values().map(|c| c.failed).sum();
    let mut counts = Vec::new();
    if quality.malformed_rows > 0 {
        counts.push(format!("{} malformed", quality.malformed_rows));
    }
    if quality.unreadable_files > 0 {
        counts.push(plural(quality.unreadable_files, "unreadable file"));
    }
    if failing > 0 {
        counts.push(format!("{failing} failing expectations"));
    }
    if counts.is_empty() { String::new() } else { format!(" ({})", counts.join(", ")) }
}

/// The lines under a flow's summary about bad input: what went to quarantine,
/// and each expectation's count.
fn quality_lines(flow: &FlowSummary) -> Vec<String> {
    let Some(quality) = &flow.quality else { return Vec::new() };
    let mut lines = Vec::new();
    if quality.quarantined_rows > 0 {
        let mut parts = Vec::new();
        if quality.malformed_rows > 0 {
            parts.push(plural(quality.malformed_rows, "malformed record"));
        }
        if quality.unreadable_files > 0 {
            parts.push(plural(quality.unreadable_files, "unreadable file"));
        }
        let by_expectation = quality.quarantined_rows - quality.malformed_rows - quality.unreadable_files;
        if by_expectation > 0 {
            parts.push(format!("{} failing expectations", plural(by_expectation, "row")));
        }
        lines.push(format!(
            "    quarantined: {} ({}) -> {}",
            plural(quality.quarantined_rows, "row"),
            parts.join(", "),
            flow.quarantine
        ));
    }
    if !quality.expectations.is_empty() {
        let counts: Vec<String> = quality
            .expectations
            .iter()
            .map(|(name, count)| format!("{name}: {} failed ({})", count.failed, count.action))
            .collect();
        lines.push(format!("    expectations: {}", counts.join(", ")));
    }
    lines
}

/// ` (5 inserted, 2 updated, ...)`: the merge's non-zero counts of changes.
fn merge_counts(merge: Option<&MergeCounts>) -> String {
    let Some(merge) = merge else { return String::new() };
    let counts: Vec<String> = merge.named()[..4]
        .iter()
        .filter(|(_, value)| *value > 0)
        .map(|(name, value)| format!("{value} {name}"))
        .collect();
    if counts.is_empty() { " (no change)".to_string() } else { format!(" ({})", counts.join(", ")) }
}

/// This process's peak resident memory (Linux `VmHWM`), if the platform tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The human summary printed at the end of a run.
pub fn summary_lines(summary: &RunSummary) -> Vec<String> {
    let mut lines = Vec::with_capacity(summary.flows.len() + 1);
    for flow in &summary.flows {
        let versions = match (flow.versions.first(), flow.versions.last()) {
            (Some(first), Some(last)) if first == last => format!(", Delta version {first}"),
            (Some(first), Some(last)) => format!(", Delta versions {first}..{last}"),
            _ => String::new(),
        };
        // What was read: files and bytes, or a Delta source's versions.
        let read = match flow.source_versions {
            Some((first, last)) if first == last => format!("source version {first}"),
            Some((first, last)) => format!("source versions {first}..{last}"),
            None => format!("{}, {}", plural(flow.files, "file"), ByteSize(flow.bytes)),
        };
        lines.push(format!(
            "  {}: {}, {read}, {}{}{versions} -> {}",
            flow.name,
            plural(flow.batches, "batch"),
            plural(flow.rows, "row"),
            merge_counts(flow.merge.as_ref()),
            flow.table
        ));
        lines.extend(quality_lines(flow));
    }
    if let Some(peak) = peak_rss_bytes() {
        lines.push(format!("  peak memory: {}", ByteSize(peak)));
    }
    let rate = if summary.seconds > 0.0 { summary.bytes as f64 / summary.seconds } else { 0.0 };
    lines.insert(
        0,
        format!(
            "pipeline {}: {}, {}, {}, {} in {:.2}s ({}/s)",
            summary.pipeline,
            plural(summary.batches, "batch"),
            plural(summary.files, "file"),
            plural(summary.rows, "row"),
            ByteSize(summary.bytes),
            summary.seconds,
            ByteSize(rate as u64)
        ),
    );
    lines
}
