//! Blocking work (PostgreSQL queries, object storage transfers) from wherever the server calls it.

/// Runs `f`, which blocks, where blocking is allowed. The `postgres` client and object storage
/// drive their I/O with runtimes of their own, which cannot block a thread of the server's
/// runtime: there `f` runs in `block_in_place`, which hands the thread's other tasks to the other
/// threads first. Off any runtime, and on tokio's blocking threads, `f` just runs.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
