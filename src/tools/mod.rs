//! The operator subcommands that replace the Flask app's `bin/ddb`, `bin/db` and `bin/cognito`
//! scripts. They print data to stdout (one JSON object per line where the SPEC says so) and
//! everything meant for a person to stderr, so output pipes cleanly into jq.

pub mod cognito;
pub mod db;
pub mod ddb;
pub mod repair;

use std::io::Write;

use serde::Serialize;

use crate::error::{Error, Result};

/// Writes one JSON document per line. A reader that goes away (`| head`) ends the command
/// quietly instead of with an error.
pub struct JsonLines<W: Write> {
    out: W,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    pub fn emit<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let line = serde_json::to_string(value).map_err(|e| Error::Failed(format!("cannot encode output: {e}")))?;
        writeln!(self.out, "{line}").map_err(output_error)
    }

    pub fn text(&mut self, line: &str) -> Result<()> {
        writeln!(self.out, "{line}").map_err(output_error)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(output_error)
    }
}

/// A write error on stdout as the library error: a closed pipe is not a failure.
pub fn output_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Error::OutputClosed
    } else {
        Error::Failed(format!("cannot write to stdout: {e}"))
    }
}
