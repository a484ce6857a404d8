//! Replays every kept fuzz input (`tests/fixtures/fuzz/<target>/`: the seed corpora and every
//! input that once found a bug) through the same checks the cargo-fuzz targets run
//! (`fuzz/checks.rs`), so a fixed crash stays fixed without a nightly toolchain.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{}: expected the seed corpus, found {} file(s)", dir.display(), files.len());
    for file in files {
        let data = std::fs::read(&file).expect("fixture");
        // One input at a time, so a failure names its file.
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{}: {why}", file.display());
        }
    }
}

#[test]
fn stream_record_inputs() {
    replay("stream_record", checks::stream_record);
}

#[test]
fn sk_parse_inputs() {
    replay("sk_parse", checks::sk_parse);
}

#[test]
fn cursor_inputs() {
    replay("cursor", checks::cursor);
}

#[test]
fn jwt_inputs() {
    replay("jwt", checks::jwt);
}
