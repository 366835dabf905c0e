//! Builds fluxflow's CUDA kernels (src/kernels/cuda/*.cu) to PTX under the `cuda` feature, with
//! the toolchain that scripts/cuda-toolchain.sh sets up (nvcc from CUDA_HOME/PATH, the target
//! GPU from CUDA_COMPUTE_CAP). Without the feature it does nothing.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels/cuda");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("src/kernels/cuda")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .unwrap_or_else(|e| panic!("building the CUDA kernels in src/kernels/cuda: {e}"));
        ptx.write(out.join("fluxflow_ptx.rs"))
            .unwrap_or_else(|e| panic!("writing the PTX bindings: {e}"));
    }
}
