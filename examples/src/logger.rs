//! A small stderr logger for the daemons: `LEVEL target: message`, with the
//! level chosen by `--log-level`.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    level: LevelFilter,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let level = match r.level() {
                Level::Error => "ERROR",
                Level::Warn => "WARN ",
                Level::Info => "INFO ",
                Level::Debug => "DEBUG",
                Level::Trace => "TRACE",
            };
            // One write per line: stderr is unbuffered, and a line
            // written piece by piece can be seen half-written by whoever
            // reads the log meanwhile. A failed write to stderr has
            // nowhere to be reported.
            let line = format!("{level} {}: {}\n", r.target(), r.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Parses a `--log-level` value.
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("invalid log level {s:?} (off, error, warn, info, debug, trace)"))
}

/// Installs the logger (once per process).
pub fn init(level: LevelFilter) {
    let logger = Box::leak(Box::new(Stderr { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
