//! The pipeline reader on arbitrary text: YAML parsing, validation and the rendering of its
//! diagnostics must return, never panic, overflow the stack or exhaust memory.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sentiflow::pipeline::{Override, Pipeline};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The last line may be a `--set` override, so overrides are fuzzed with the file.
    let (source, set) = match text.rsplit_once("\n#set ") {
        Some((source, set)) => (source, set.parse::<Override>().ok()),
        None => (text, None),
    };
    let overrides: Vec<Override> = set.into_iter().collect();
    if let Err(d) = Pipeline::parse(Path::new("fuzz.yaml"), source, &overrides, &|_| Some("x".into())) {
        let _ = d.render();
        let _ = d.to_string();
    }
});
