//! Fuzz target `stream_record`: the checks live in `fuzz/checks.rs`, shared with the regression test
//! `tests/it/fuzz_regressions.rs` that replays every kept input.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::stream_record(data));
