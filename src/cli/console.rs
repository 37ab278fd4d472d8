//! The progress of a run on the terminal: a bar and the running stages, or one line per event
//! when the output is not a terminal.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::exec::Observer;
use crate::pipeline::report::{StageReport, State};

/// Shows progress: a bar on a terminal, one line per event otherwise.
pub(super) struct Console {
    bar: Option<ProgressBar>,
    running: Mutex<Vec<String>>,
    /// Only failures and warnings.
    quiet: bool,
}

impl Console {
    pub(super) fn new(total: usize, terminal: bool, quiet: bool) -> Self {
        let bar = (terminal && !quiet).then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {elapsed} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Console {
            bar,
            running: Mutex::new(Vec::new()),
            quiet,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn update(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.running.lock().unwrap().join(", "));
        }
    }

    pub(super) fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Console {
    fn started(&self, stage: &str) {
        self.running.lock().unwrap().push(stage.to_string());
        self.update();
    }

    fn finished(&self, r: &StageReport) {
        self.running.lock().unwrap().retain(|s| s != &r.name);
        let text = match r.state {
            State::Ran => format!("ran      {} ({:.2}s)", r.name, r.duration_ms as f64 / 1000.0),
            State::Cached => format!("cached   {}", r.name),
            State::Fetched => format!("fetched  {}", r.name),
            State::Failed => format!("FAILED   {}: {}", r.name, r.error.as_deref().unwrap_or("")),
            State::Skipped => format!("skipped  {}: {}", r.name, r.error.as_deref().unwrap_or("")),
            State::Interrupted => format!("stopped  {}", r.name),
        };
        if !self.quiet || r.state == State::Failed {
            self.line(&text);
        }
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        self.update();
    }

    // The console prints the placement as a log line already.
    fn placed(&self, _stage: &str, _placement: &crate::executors::Placement) {}

    fn log(&self, stage: &str, line: &str) {
        if !self.quiet {
            self.line(&format!("[{stage}] {line}"));
        }
    }

    fn warn(&self, message: &str) {
        self.line(&format!("warning: {message}"));
    }
}
