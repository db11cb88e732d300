//! A command's result on stdout: a write that fails (a full disk, `> /dev/full`) is the
//! command's error, an exit ≠ 0 with one line on stderr, where `println!` would panic. A reader
//! that went away (`| head -1`) is not an error: the command ends quietly.

use std::fmt;
use std::io::{ErrorKind, Write};

/// The reader of stdout closed it: nothing more to say, and nothing went wrong.
#[derive(Debug)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for Closed {}

/// Writes `args` and a newline to stdout, and flushes them.
pub fn line(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe => anyhow::Error::new(Closed),
            _ => anyhow::Error::new(e).context("cannot write the result to stdout"),
        })
}

/// `println!` whose failure is the command's error (see the module).
macro_rules! outln {
    ($($t:tt)*) => {
        $crate::out::line(format_args!($($t)*))?
    };
}
pub(crate) use outln;
