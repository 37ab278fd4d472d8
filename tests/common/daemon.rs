//! Processes the engine harnesses start and stop: free ports, daemons in sessions of their own,
//! and the sweep that kills what a cluster left behind.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `n` ports free now, all different.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A daemon in a session of its own (so it and what it forks can be found by session id),
/// optionally as another user, sent SIGTERM if the test binary dies. The thread that spawned it
/// waits for it, so the parent-death signal (which follows the spawning thread) fires only when
/// the process ends.
pub struct Daemon {
    pub pid: i32,
    exit: Arc<Mutex<Option<ExitStatus>>>,
}

impl Daemon {
    pub fn spawn(mut cmd: Command, user: Option<(u32, u32)>) -> Daemon {
        let what = format!("{:?}", cmd.get_program());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid)) = user {
                    if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After the change of user, which would clear it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let exit = Arc::new(Mutex::new(None));
        let slot = exit.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                tx.send(Ok(child.id() as i32)).unwrap();
                let status = child.wait().unwrap();
                *slot.lock().unwrap() = Some(status);
            }
            Err(e) => tx.send(Err(e)).unwrap(),
        });
        let pid = rx.recv().unwrap().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Daemon { pid, exit }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.lock().unwrap()
    }
}

/// SIGKILLs, until none is left, every process (but this one and zombies) that is in one of
/// `sessions` or has an environment variable `wanted` accepts.
pub fn sweep(sessions: &[i32], wanted: impl Fn(&[u8]) -> bool) {
    let me = std::process::id() as i32;
    for _ in 0..100 {
        let mut found = false;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid pgrp session ...`; comm may hold spaces and parentheses.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            if fields.len() < 4 || fields[0] == "Z" || fields[0] == "X" {
                continue;
            }
            let in_session = fields[3].parse::<i32>().is_ok_and(|sid| sessions.contains(&sid));
            let marked =
                || std::fs::read(entry.path().join("environ")).is_ok_and(|env| env.split(|b| *b == 0).any(&wanted));
            if in_session || marked() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                found = true;
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `max` bytes of a file, from a line start.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(max)..]).into_owned();
    if text.len() < max {
        return text;
    }
    text.split_once('\n').map(|(_, rest)| rest.to_string()).unwrap_or(text)
}
