//! Gives the `imgclf` binary (and the host's test binaries) a RUNPATH to the libtorch it was
//! built against, so it runs from anywhere without LD_LIBRARY_PATH (which still overrides it).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{lib}");
    }
}
