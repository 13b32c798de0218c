//! # tensor: f32 tensors on the GPU (WGSL through wgpu) and on the CPU
//!
//! The bottom layer of the stack. A [`Tensor`] is an f32 array, contiguous and row-major, that
//! lives on a [`Device`]: `Device::Gpu` runs WGSL compute kernels through wgpu (Vulkan, Metal,
//! DX12 or GL), `Device::Cpu` runs the same ops in Rust, vectorised ([`fastmath`]) and threaded
//! ([`cpu`]): the fallback for real work where there is no GPU. Both backends are tested against
//! [`reference`](mod@reference), plain f64 loops written from each op's math.
//!
//! Reading order:
//! 1. [`tensor`]: the `Tensor` type, upload and download;
//! 2. [`device`]: choosing a device;
//! 3. [`ops::elementwise`]: the smallest op, showing the pattern every op follows: math in the
//!    doc comment, CPU path, GPU launcher, tests that compare both with [`reference`](mod@reference);
//! 4. [`ops::matmul`]: the tiled, register-blocked matrix product, and [`sgemm`]: which
//!    library computes it on the CPU, chosen by measurement; on the GPU, [`ops::matmul_tiled`]
//!    (the second-generation kernel and which kernel runs a product) and [`ops::matmul_tune`]
//!    (measuring that per adapter and class of shapes); its views of column blocks
//!    ([`ops::matmul::matmul_into`]) and groups of products in one dispatch
//!    ([`ops::matmul::matmul_into_group`]: LoRA's q and v parts together);
//! 5. [`gpu`]: how a launch becomes a dispatch in a batched command encoder, buffer pooling,
//!    splitting tensors larger than one storage binding;
//! 6. [`shaders`]: the registry of `shaders/*.wgsl` at the repository root, one file per kernel
//!    family, each preceded by the prelude `shaders/common.wgsl`;
//! 7. [`quant`]: NF4, the 4-bit storage of QLoRA's frozen weights, as bitsandbytes writes it;
//! 8. `testing` (behind the feature of that name): what the tests of this crate and of the
//!    crates above it share: devices, random data, `assert_close`, `on_devices!`.
//!
//! Shapes follow one vocabulary throughout the workspace: B batch, T time (sequence), C channels,
//! NH heads, hs = C/NH head size, V vocabulary, N = B·T rows.
//!
//! ```
//! use tensor::{Device, Tensor, ops::elementwise::add};
//! let cpu = Device::cpu();
//! let a = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], &cpu).unwrap();
//! let b = Tensor::from_vec(vec![10.0, 20.0, 30.0], &[3], &cpu).unwrap();
//! assert_eq!(add(&a, &b).unwrap().to_vec().unwrap(), vec![11.0, 22.0, 33.0]);
//! ```

pub mod counts;
pub mod cpu;
pub mod device;
mod error;
pub mod fastmath;
pub mod gpu;
pub mod memory;
pub mod ops;
pub mod profile;
pub mod quant;
pub mod reference;
pub mod sgemm;
pub mod shaders;
pub mod tensor;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use device::{Device, DeviceChoice};
pub(crate) use error::shape_err;
pub use error::{Error, Result};
pub use gpu::{GpuContext, GpuInfo, GpuOptions};
pub use memory::MemoryStats;
pub use tensor::Tensor;
