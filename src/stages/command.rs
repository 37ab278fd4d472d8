//! `uses: command`: a shell command with declared dependencies and outputs, like a DVC stage.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::stage::{Context, Stage, StageError};
use crate::cache::Metrics;

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

    fn shell_fields(&self) -> &'static [&'static str] {
        &["run"]
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let mut command = std::process::Command::new("sh");
        command.arg("-c").arg(&self.run);
        run_process(ctx, command, &self.run)?;
        Ok(Metrics::new())
    }
}

/// How long an interrupted stage has, after SIGTERM, before its whole process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `command` in the project root with its output in the stage's log; an interrupt of the
/// run stops it. `display` names it in errors.
///
/// The command and everything it starts live in one process group, which never outlives the
/// engine: an interrupt sends the group SIGTERM, then SIGKILL after [`STOP_GRACE`]; if the
/// engine itself dies, even by SIGKILL, PR_SET_PDEATHSIG stops the command and the [`Watchdog`]
/// stops the rest of its group.
pub(super) fn run_process(ctx: &Context, mut command: std::process::Command, display: &str) -> Result<(), StageError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let watchdog = Watchdog::get();
    let engine = std::process::id() as libc::pid_t;
    command
        .current_dir(ctx.root)
        .env("SENTIFLOW_STAGE", ctx.stage)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: an interrupt reaches the engine, which stops the whole
        // group, instead of racing the child.
        .process_group(0);
    // SAFETY: runs in the child between fork and exec, and calls only prctl(2) and getppid(2),
    // which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // SIGTERM when the thread that forked the child exits. That thread is this one, and it
            // waits for the child below, so only the death of the engine comes first.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The engine may have died before prctl: the child then has another parent already.
            if libc::getppid() != engine {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    let mut child = command.spawn().map_err(|e| StageError::io(&program, e))?;
    let group = child.id() as libc::pid_t;
    if let Some(w) = watchdog {
        w.tell('+', group);
    }

    let status = std::thread::scope(|scope| {
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        scope.spawn(|| forward(stdout, ctx));
        scope.spawn(|| forward(stderr, ctx));
        let mut terminated: Option<Instant> = None;
        let mut killed = false;
        while !exited(group).map_err(|e| StageError::io(&program, e))? {
            if terminated.is_none() && ctx.cancel.load(Ordering::SeqCst) {
                signal_group(group, libc::SIGTERM);
                terminated = Some(Instant::now());
            }
            if !killed && terminated.is_some_and(|t| t.elapsed() >= STOP_GRACE) {
                signal_group(group, libc::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if terminated.is_some() {
            // What the command left running. Its leader is exited but not yet reaped, so the
            // group id cannot have been reused by anyone else.
            signal_group(group, libc::SIGKILL);
        }
        if let Some(w) = watchdog {
            w.tell('-', group);
        }
        let status = child.wait().map_err(|e| StageError::io(&program, e))?;
        match terminated {
            Some(_) => Err(StageError::Cancelled),
            None => Ok(status),
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

/// Whether process `pid`, a child, has exited; it is left unreaped (`WNOWAIT`), so its pid and
/// process group id stay reserved until `Child::wait`.
fn exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: an all-zero siginfo_t is valid, and waitid(2) only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is a valid, writable siginfo_t.
    if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` in (si_pid stays 0 while the child runs).
    Ok(unsafe { info.si_pid() } != 0)
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals a process group; it touches no memory.
    unsafe { libc::kill(-group, signal) };
}

/// Stops the process groups of running stages when the engine's process dies, however it dies.
/// A SIGKILLed engine can stop nothing itself, and PR_SET_PDEATHSIG reaches only its children,
/// not what they start (`sleep 30 &` in a stage's shell). So each engine process starts one
/// small shell, in a process group of its own (out of reach of a terminal's Ctrl-C), reading a
/// socket whose other end only the engine holds: the engine writes `+ GROUP` as a stage starts
/// and `- GROUP` before reaping it. When the socket reads end-of-file the engine is gone, and the
/// shell sends SIGTERM to every group left, then SIGKILL to those still there after
/// [`STOP_GRACE`].
///
/// (A supervisor shell between the engine and each command could forward signals too, but a
/// non-interactive shell starts background commands with SIGINT and SIGQUIT ignored, which would
/// change how every stage program behaves.)
struct Watchdog {
    /// Locked while sending, so lines from stages running at once never interleave.
    socket: Mutex<UnixStream>,
}

const WATCHDOG_SCRIPT: &str = r#"groups=' '
while read -r op group; do
  case $op$groups in
    +*) groups="$groups$group " ;;
    -*" $group "*) groups="${groups%% $group *} ${groups#* $group }" ;;
  esac
done
for g in $groups; do kill -s TERM -- "-$g"; done
waited=0
while [ "$waited" -lt "$1" ]; do
  left=
  for g in $groups; do kill -s 0 -- "-$g" && left="$left $g"; done
  groups=$left
  [ -n "$groups" ] || exit 0
  sleep 1
  waited=$((waited + 1))
done
for g in $groups; do kill -s KILL -- "-$g"; done
"#;

static WATCHDOG: OnceLock<Option<Watchdog>> = OnceLock::new();

impl Watchdog {
    /// This process's watchdog, started on first use; none if it cannot start (then a killed
    /// engine may leave stage processes behind, as it is told).
    fn get() -> Option<&'static Watchdog> {
        WATCHDOG
            .get_or_init(|| {
                Watchdog::start()
                    .map_err(|e| {
                        tracing::warn!("cannot start the stage watchdog (sh): {e}; stages may outlive a killed engine")
                    })
                    .ok()
            })
            .as_ref()
    }

    fn start() -> std::io::Result<Watchdog> {
        // Both ends are close-on-exec: no stage inherits ours, which would hide the engine's end.
        let (socket, theirs) = UnixStream::pair()?;
        // Never waited for: it outlives the engine by design, and exits when the engine does.
        let _detached = std::process::Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("sentiflow-watchdog")
            .arg(STOP_GRACE.as_secs().to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            socket: Mutex::new(socket),
        })
    }

    /// Tells the watchdog that `group` started (`+`) or is over (`-`). Sent with MSG_NOSIGNAL: if
    /// the watchdog died, only its protection is lost, never the engine (which may run with
    /// SIGPIPE's default action).
    fn tell(&self, op: char, group: libc::pid_t) {
        let line = format!("{op} {group}\n");
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: sends bytes from a live buffer on a socket this struct owns.
        unsafe { libc::send(socket.as_raw_fd(), line.as_ptr().cast(), line.len(), libc::MSG_NOSIGNAL) };
    }
}

fn forward(stream: impl Read, ctx: &Context) {
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => (ctx.log)(&line),
            Err(_) => break,
        }
    }
}
