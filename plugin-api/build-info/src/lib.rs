//! The libtorch this crate was compiled against, recorded by `build.rs` from libtorch's version
//! header. `imgclf-plugin-api` re-exports it, so each plugin carries the libtorch *its* build
//! used, and the host compares that with the libtorch loaded at run time.

/// `major.minor.patch` of the libtorch headers the build used, or `unknown`.
pub const LIBTORCH_VERSION: &str = env!("IMGCLF_LIBTORCH_BUILD_VERSION");
/// The file that version was read from (empty when unknown).
pub const LIBTORCH_ORIGIN: &str = env!("IMGCLF_LIBTORCH_BUILD_ORIGIN");

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_is_read_from_the_headers_the_build_used() {
        let v = super::LIBTORCH_VERSION;
        let parts: Vec<&str> = v.split('.').collect();
        assert_eq!(parts.len(), 3, "{v}");
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()), "{v}");
        let header = std::fs::read_to_string(super::LIBTORCH_ORIGIN).unwrap();
        assert!(header.contains(&format!("TORCH_VERSION_MAJOR {}", parts[0])));
        assert!(header.contains(&format!("TORCH_VERSION_MINOR {}", parts[1])));
    }
}
