//! Standard output for commands whose output is read by another program that may stop early:
//! `tollgate check | head -1`, `tollgate report … | head -1`.
//!
//! Rust ignores SIGPIPE, so a write after the reader has gone fails with `BrokenPipe`, and
//! `println!` panics on it. A command that writes through [`Stdout`] instead ends with an error
//! [`reader_gone`] recognizes, and the command line turns that into a quiet success, as `head`
//! expects of the program before it. Only the error this writer made is treated so: a broken
//! pipe anywhere else (a socket) stays an error.

use std::io::{self, Write};

/// The process's standard output, locked for one command.
pub struct Stdout(io::StdoutLock<'static>);

impl Stdout {
    pub fn lock() -> Self {
        Self(io::stdout().lock())
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the reader of standard output has gone")]
struct ReaderGone;

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, ReaderGone)
    } else {
        e
    }
}

/// Whether a command ended because the reader of its output went away.
pub fn reader_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(|e| e.get_ref())
            .is_some_and(|inner| inner.is::<ReaderGone>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_writers_broken_pipe_is_the_reader_leaving() {
        let ours = anyhow::Error::from(mark(io::ErrorKind::BrokenPipe.into()));
        assert!(reader_gone(&ours));
        assert!(reader_gone(&ours.context("printing the report")));
        let socket = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!reader_gone(&socket));
        let other = anyhow::Error::from(mark(io::ErrorKind::PermissionDenied.into()));
        assert!(!reader_gone(&other));
    }
}
