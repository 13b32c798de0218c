//! The CPU backend's f32 product `C ← α·A·B + β·C` on strided views, and the library that
//! computes it.
//!
//! Two well-kept Rust SGEMMs are linked, and which one runs is chosen once per process:
//!
//! - [`CpuGemm::Gemm`], the `gemm` crate: packed panels and micro-kernels for AVX-512
//!   (8 × 16-lane registers), AVX2 + FMA and NEON, chosen at run time, threads from rayon.
//! - [`CpuGemm::Matrixmultiply`], the `matrixmultiply` crate: a BLIS-style loop nest, its own
//!   thread pool.
//!
//! The choice is a measurement, not a belief (`docs/benchmarks.md`, "The CPU product and the
//! CPU's threads on an AVX-512 machine"): on a 2-core Xeon with AVX-512, `gemm` computes the
//! training step's products 1.1–1.9× faster, and the thin LoRA ones up to 5×; built for AVX2
//! alone, on the same cores, it is 0.65–0.92× of `matrixmultiply` on the wide ones. So [`CpuGemm::auto`] takes `gemm` where the CPU has
//! AVX-512F and `matrixmultiply` elsewhere. `TENSOR_CPU_GEMM=gemm|matrixmultiply` in the
//! environment, or [`set_cpu_gemm`] (the `train` binary's `--cpu-gemm`) before the first
//! product, forces one. Both are checked against the f64 loop of
//! [`reference::matmul`](crate::reference::matmul).
//!
//! The two add in different orders, so their results differ by rounding (a few ulps of each
//! sum); a run is reproducible with one library on one machine.

use std::sync::OnceLock;

/// Which library computes the CPU backend's products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuGemm {
    /// The `gemm` crate (AVX-512, AVX2, NEON micro-kernels; rayon threads).
    Gemm,
    /// The `matrixmultiply` crate (AVX2 + FMA and AVX-512 kernels; its own threads).
    Matrixmultiply,
}

impl CpuGemm {
    /// The library for this CPU: `gemm` where it has AVX-512F, `matrixmultiply` elsewhere
    /// (the measurement behind it is in the module doc).
    pub fn auto() -> CpuGemm {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return CpuGemm::Gemm;
        }
        CpuGemm::Matrixmultiply
    }

    /// The crate's name, as `--cpu-gemm` and `TENSOR_CPU_GEMM` spell it.
    pub fn name(self) -> &'static str {
        match self {
            CpuGemm::Gemm => "gemm",
            CpuGemm::Matrixmultiply => "matrixmultiply",
        }
    }

    /// `auto`, `gemm` or `matrixmultiply` (`auto` resolves to [`CpuGemm::auto`]).
    pub fn parse(s: &str) -> Result<CpuGemm, String> {
        match s {
            "auto" => Ok(CpuGemm::auto()),
            "gemm" => Ok(CpuGemm::Gemm),
            "matrixmultiply" => Ok(CpuGemm::Matrixmultiply),
            other => Err(format!(
                "unknown CPU matmul library {other:?}: expected auto, gemm or matrixmultiply"
            )),
        }
    }
}

static CHOICE: OnceLock<CpuGemm> = OnceLock::new();

/// The library this process uses: the one [`set_cpu_gemm`] chose, else `TENSOR_CPU_GEMM`, else
/// [`CpuGemm::auto`]. Fixed at the first product. An unreadable `TENSOR_CPU_GEMM` panics with
/// the accepted values (it is read where no `Result` can carry it).
pub fn cpu_gemm() -> CpuGemm {
    *CHOICE.get_or_init(|| match std::env::var("TENSOR_CPU_GEMM") {
        Ok(v) => CpuGemm::parse(&v).unwrap_or_else(|e| panic!("TENSOR_CPU_GEMM: {e}")),
        Err(_) => CpuGemm::auto(),
    })
}

/// Chooses the library before the first product. Fails when another one already computed a
/// product in this process (the choice is fixed then, so a run never mixes the two).
pub fn set_cpu_gemm(choice: CpuGemm) -> crate::Result<()> {
    let now = *CHOICE.get_or_init(|| choice);
    if now == choice {
        Ok(())
    } else {
        Err(crate::Error::Invalid(format!(
            "the CPU matmul library is already {} in this process; it cannot become {}",
            now.name(),
            choice.name()
        )))
    }
}

/// A strided matrix operand: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub ptr: T,
    pub rs: usize,
    pub cs: usize,
}

/// `C ← α·A·B + β·C`, A m×k, B k×n, C m×n. With `β = 0`, C is written without being read (it
/// may be uninitialised). `parallel` lets gemm use every thread on a product large enough to
/// pay for it; without it gemm runs the product on the calling thread (callers that already
/// split work over the cores). matrixmultiply takes no such flag: its own size heuristic keeps
/// the products these callers pass without it (attention tiles, per-head batches below
/// `SMALL_GEMM`) on one thread.
///
/// # Safety
/// Each view must cover its matrix inside one allocation, and C must alias neither A nor B.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat<*const f32>,
    b: Mat<*const f32>,
    beta: f32,
    c: Mat<*mut f32>,
    parallel: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe { sgemm_with(cpu_gemm(), m, k, n, alpha, a, b, beta, c, parallel) }
}

/// [`sgemm`] by the library `lib`, whatever this process chose (the tests compare both).
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_with(
    lib: CpuGemm,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: Mat<*const f32>,
    b: Mat<*const f32>,
    beta: f32,
    c: Mat<*mut f32>,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    match lib {
        // SAFETY: forwarded from the caller.
        CpuGemm::Matrixmultiply => unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha,
                a.ptr,
                a.rs as isize,
                a.cs as isize,
                b.ptr,
                b.rs as isize,
                b.cs as isize,
                beta,
                c.ptr,
                c.rs as isize,
                c.cs as isize,
            )
        },
        CpuGemm::Gemm => {
            if k == 0 {
                // An empty sum: C ← β·C (and C ← 0 without reading it when β = 0).
                for i in 0..m {
                    for j in 0..n {
                        // SAFETY: (i, j) is inside C's view.
                        unsafe {
                            let p = c.ptr.add(i * c.rs + j * c.cs);
                            *p = if beta == 0.0 { 0.0 } else { beta * *p };
                        }
                    }
                }
                return;
            }
            let threads = crate::cpu::threads();
            let par = if parallel && threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // gemm's convention: dst ← alpha·dst + beta·lhs·rhs, dst read only when
            // `read_dst`; strides are (column, row).
            // SAFETY: forwarded from the caller.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.ptr,
                    c.cs as isize,
                    c.rs as isize,
                    beta != 0.0,
                    a.ptr,
                    a.cs as isize,
                    a.rs as isize,
                    b.ptr,
                    b.cs as isize,
                    b.rs as isize,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    par,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both libraries against a plain f64 loop, whichever one this process uses: every
    /// transpose layout, β = 0 over garbage, β = 1, α ≠ 1, K = 0, thin and odd shapes,
    /// threaded and not.
    #[test]
    fn both_libraries_match_the_f64_loop() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (17, 0, 9),
            (64, 64, 64),
            (130, 33, 8),
            (8, 300, 70),
            (200, 150, 90),
        ];
        for &(m, k, n) in &shapes {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 97) as f32) / 48.0 - 1.0)
                .collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0)] {
                    for parallel in [false, true] {
                        let av = if ta {
                            Mat {
                                ptr: a.as_ptr(),
                                rs: 1,
                                cs: m,
                            }
                        } else {
                            Mat {
                                ptr: a.as_ptr(),
                                rs: k,
                                cs: 1,
                            }
                        };
                        let bv = if tb {
                            Mat {
                                ptr: b.as_ptr(),
                                rs: 1,
                                cs: k,
                            }
                        } else {
                            Mat {
                                ptr: b.as_ptr(),
                                rs: n,
                                cs: 1,
                            }
                        };
                        let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
                        let want: Vec<f64> = (0..m * n)
                            .map(|idx| {
                                let (i, j) = (idx / n, idx % n);
                                let s: f64 = (0..k)
                                    .map(|p| {
                                        let x = if ta { a[p * m + i] } else { a[i * k + p] };
                                        let y = if tb { b[j * k + p] } else { b[p * n + j] };
                                        x as f64 * y as f64
                                    })
                                    .sum();
                                alpha as f64 * s + beta as f64 * c0[idx] as f64
                            })
                            .collect();
                        for lib in [CpuGemm::Gemm, CpuGemm::Matrixmultiply] {
                            let mut c = if beta == 0.0 {
                                vec![f32::NAN; m * n]
                            } else {
                                c0.clone()
                            };
                            let cv = Mat {
                                ptr: c.as_mut_ptr(),
                                rs: n,
                                cs: 1,
                            };
                            // SAFETY: the views cover the vectors, C is its own vector.
                            unsafe { sgemm_with(lib, m, k, n, alpha, av, bv, beta, cv, parallel) };
                            for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                                assert!(
                                    (got as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                    "{lib:?} {m}x{k}x{n} ta {ta} tb {tb} α {alpha} β {beta} \
                                     parallel {parallel}: C[{idx}] = {got}, expected {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
