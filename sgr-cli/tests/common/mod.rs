//! Helpers shared by the tests of the `sgr` binary (each test binary uses a subset).
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the `sgr` binary built for these tests.
pub fn sgr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sgr"))
        .args(args)
        .output()
        .expect("run sgr")
}

/// stdout and stderr of a run, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
