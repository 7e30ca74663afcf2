//! The Rust side of the C++ shim in `plugin-api/cpp` (built by `build.rs`): its error
//! convention, shared by the modules that wrap it ([`crate::amp`], the optimizer kernels).
//!
//! Every shim function returns a `malloc`ed message on failure (a caught C++ exception) and
//! NULL on success; [`check`] turns that into an [`Error`](crate::Error).

use std::ffi::{c_char, CStr};

extern "C" {
    fn imgclf_shim_free(message: *mut c_char);
}

/// `Ok` for a NULL message; otherwise the message (without libtorch's backtrace), freed.
pub(crate) fn check(message: *mut c_char, what: &str) -> crate::Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL result is a NUL-terminated string the shim allocated with malloc and
    // hands over to us; it is read once and freed once.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { imgclf_shim_free(message) };
    Err(crate::Error(format!(
        "{what}: {}",
        crate::error::clean_torch_message(&text)
    )))
}
