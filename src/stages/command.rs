//! `uses: command`: a shell command with declared dependencies and outputs, like a DVC stage.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Context, Metrics, Stage, StageError};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Shell command, run by `sh -c` in the project root.
    pub run: String,
    /// Files or directories the command reads; their content is part of the cache key.
    #[serde(default)]
    pub deps: Vec<String>,
    /// Files or directories the command writes; they are cached and restored.
    #[serde(default)]
    pub outs: Vec<String>,
}

impl Stage for Command {
    fn version(&self) -> u32 {
        1
    }

    fn deps(&self) -> Vec<String> {
        self.deps.clone()
    }

    fn outs(&self) -> Vec<String> {
        self.outs.clone()
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let mut command = std::process::Command::new("sh");
        command.arg("-c").arg(&self.run);
        run_process(ctx, command, &self.run)?;
        Ok(Metrics::new())
    }
}

/// Runs `command` in the project root with its output in the stage's log; an interrupt of the
/// run stops it. `display` names it in errors.
pub(super) fn run_process(ctx: &Context, mut command: std::process::Command, display: &str) -> Result<(), StageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .current_dir(ctx.root)
        .env("SENTIFLOW_STAGE", ctx.stage)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: an interrupt reaches the engine, which stops the whole
        // group, instead of racing the child.
        .process_group(0)
        .spawn()
        .map_err(|e| StageError::io(&program, e))?;

    let status = std::thread::scope(|scope| {
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        scope.spawn(|| forward(stdout, ctx));
        scope.spawn(|| forward(stderr, ctx));
        loop {
            if let Some(status) = child.try_wait().map_err(|e| StageError::io(&program, e))? {
                return Ok(status);
            }
            if ctx.cancel.load(Ordering::SeqCst) {
                // SAFETY: kill(2) with a negative pid signals the child's process group.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
                let _ = child.wait();
                return Err(StageError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })?;
    if !status.success() {
        return Err(StageError::CommandFailed {
            command: display.to_string(),
            status: status.to_string(),
        });
    }
    Ok(())
}

fn forward(stream: impl Read, ctx: &Context) {
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => (ctx.log)(&line),
            Err(_) => break,
        }
    }
}
