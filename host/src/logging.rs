//! Logging: `tracing` to stderr (drawn around the progress bar) and, once a run has an output
//! directory, also to its `log.txt`.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

struct Sinks {
    file: Option<std::fs::File>,
    bar: Option<indicatif::ProgressBar>,
}

fn sinks() -> &'static Mutex<Sinks> {
    static SINKS: OnceLock<Mutex<Sinks>> = OnceLock::new();
    SINKS.get_or_init(|| {
        Mutex::new(Sinks {
            file: None,
            bar: None,
        })
    })
}

/// Also write every log line to this file (the run's `log.txt`).
pub fn log_to_file(file: std::fs::File) {
    sinks().lock().unwrap().file = Some(file);
}

/// Route stderr log lines around this progress bar while it is shown.
pub fn set_progress_bar(bar: Option<indicatif::ProgressBar>) {
    sinks().lock().unwrap().bar = bar;
}

#[derive(Clone, Copy)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = sinks().lock().unwrap();
        if let Some(f) = s.file.as_mut() {
            let _ = f.write_all(buf);
        }
        match &s.bar {
            Some(bar) if !bar.is_hidden() => bar.suspend(|| std::io::stderr().write_all(buf)),
            _ => std::io::stderr().write_all(buf),
        }?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = sinks().lock().unwrap();
        if let Some(f) = s.file.as_mut() {
            let _ = f.flush();
        }
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs the subscriber: `info` by default, `RUST_LOG` or `-v` for more.
pub fn init(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
