//! Exit codes: what a script calling sentiflow can rely on.

pub const OK: i32 = 0;
/// A stage failed, or something the command needs (ONNX Runtime) is missing.
pub const FAILED: i32 = 1;
/// The pipeline or the command line is invalid.
pub const INVALID: i32 = 2;
/// Interrupted by a signal.
pub const INTERRUPTED: i32 = 130;
