//! The `imgclf` binary.

fn main() {
    // Must come first: anything that queries CUDA before libtorch_cuda.so is loaded leaves
    // CUDA unusable for the whole process.
    imgclf::cuda::init();
    imgclf::allocator::tune();
    std::process::exit(imgclf::cli::main());
}
