//! The error type plugins return; it becomes a string when it crosses the ABI.

use std::fmt;

/// An error raised inside a plugin (bad config value, shape mismatch, libtorch failure...).
#[derive(Debug, Clone)]
pub struct Error(pub String);

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error(clean_torch_message(&e.to_string()))
    }
}

/// libtorch messages carry a multi-kilobyte C++ backtrace after this marker; users need the
/// first line, not the trace.
pub fn clean_torch_message(message: &str) -> String {
    let cut = message
        .find("\nException raised from")
        .unwrap_or(message.len());
    message[..cut].trim_end().to_string()
}

/// `bail!`-like shorthand for plugin code.
#[macro_export]
macro_rules! plugin_bail {
    ($($arg:tt)*) => { return Err($crate::Error(format!($($arg)*))) };
}
