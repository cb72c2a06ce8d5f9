//! Progress of a run: a bar on a terminal, one plain line per second otherwise (CI logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A running progress display; stopped by `finish` (or on drop).
#[derive(Debug)]
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `label` for a run of `length`; `counts` returns (sent, acked, consumed).
    pub fn start<F>(enabled: bool, label: String, length: Duration, counts: F) -> Progress
    where
        F: Fn() -> (u64, u64, u64) + Send + 'static,
    {
        if !enabled {
            return Progress { task: None };
        }
        let terminal = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let total_ms = length.as_millis().max(1) as u64;
            let bar = terminal.then(|| {
                let bar = ProgressBar::new(total_ms);
                bar.set_style(
                    ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>4} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                );
                bar.set_prefix(label.clone());
                bar
            });
            let mut last = (0u64, Instant::now());
            let tick = if terminal {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(1)
            };
            let mut interval = tokio::time::interval(tick);
            interval.tick().await;
            loop {
                interval.tick().await;
                let (sent, acked, consumed) = counts();
                let now = Instant::now();
                let rate = (acked.saturating_sub(last.0)) as f64
                    / now.duration_since(last.1).as_secs_f64().max(1e-3);
                last = (acked, now);
                let elapsed = start.elapsed();
                let line = format!(
                    "sent {sent} acked {acked} ({rate:.0}/s) consumed {consumed}{}",
                    if elapsed > length { " (draining)" } else { "" }
                );
                match &bar {
                    Some(bar) => {
                        bar.set_position((elapsed.as_millis() as u64).min(total_ms));
                        bar.set_message(line);
                    }
                    None => eprintln!("  [{:>5.1} s] {label}: {line}", elapsed.as_secs_f64()),
                }
            }
        });
        Progress { task: Some(task) }
    }

    /// Stops the display.
    pub fn finish(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
