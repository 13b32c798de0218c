//! Matrix product: `C = op(A)·op(B) [+ bias]`, batched, with transpose flags, and its in-place
//! accumulating form `C += op(A)·op(B)`.
//!
//! # Math and shapes
//! `op(X)` is `X`, or `Xᵀ` when the operand's transpose flag is set. For every batch index z,
//! `0 ≤ i < M`, `0 ≤ j < N`:
//!
//! ```text
//! C[z, i, j] = bias[j] + Σ_{p<K} op(A)[z, i, p] · op(B)[z, p, j]
//! ```
//! - A: `(…, M, K)`, or `(…, K, M)` with `trans_a`;
//! - B: `(…, K, N)`, or `(…, N, K)` with `trans_b`; the leading (batch) dims equal A's, or B is
//!   2-D and shared by every batch entry;
//! - bias: `(N)`, optional, added to every row; C: A's leading dims then `(M, N)`.
//!
//! A transposed operand is read in place (no copy): the flag only changes the strides.
//!
//! # Backward
//! Given dC, both gradients are products again, with transpose flags instead of copies
//! (`ta`/`tb` below mean `MatmulOpts { trans_a: true, .. }` / `{ trans_b: true, .. }`):
//!
//! | forward `C =` | flags      | `dA =` (A's shape)                | `dB =` (B's shape)                |
//! |---------------|------------|-----------------------------------|-----------------------------------|
//! | `A·B`         | none       | `dC·Bᵀ  = matmul(dC, B, tb)`      | `Aᵀ·dC  = matmul(A, dC, ta)`      |
//! | `A·Bᵀ`        | `tb`       | `dC·B   = matmul(dC, B, none)`    | `dCᵀ·A  = matmul(dC, A, ta)`      |
//! | `Aᵀ·B`        | `ta`       | `B·dCᵀ  = matmul(B, dC, tb)`      | `A·dC   = matmul(A, dC, none)`    |
//! | `Aᵀ·Bᵀ`       | `ta`, `tb` | `Bᵀ·dCᵀ = matmul(B, dC, ta + tb)` | `dCᵀ·Aᵀ = matmul(dC, A, ta + tb)` |
//!
//! and `dbias = Σ_rows dC`. Batched operands give batched gradients. When B is 2-D and shared
//! by the batch, dB sums over the batch: without `trans_a`, fold the batch into rows (reshape A
//! to `(batch·M, K)` and dC to `(batch·M, N)`) and use the 2-D rule. (The tape computes each
//! gradient with [`matmul`] and adds it to the parameter's buffer with
//! [`axpy`](crate::ops::elementwise::axpy); [`matmul_accumulate`], `C += op(A)·op(B)` in place, is
//! the kernel's accumulating mode, which the K-chunk split below relies on, offered as an op.)
//!
//! # Backends
//! CPU: [`sgemm`](crate::sgemm) (the `gemm` or the `matrixmultiply` crate, threaded, arbitrary
//! strides); the oracle both backends are
//! tested against is [`reference::matmul`](crate::reference::matmul), a plain triple loop in
//! f64. GPU: `shaders/matmul.wgsl`, 64×64 output tiles staged in
//! workgroup memory, 4×4 outputs per invocation (or `matmul_tiled.wgsl`'s 128×128 tiles, or, for
//! a small output with a long K such as LoRA's weight gradients, the split-K pair of
//! `matmul_splitk.wgsl`: K in slices summed by a second pass, `matmul_splitk.rs`). A 2-D
//! problem whose operands exceed one storage binding is cut into sub-blocks along each
//! operand's stored-row dimension (M, N and K chunks;
//! K chunks after the first accumulate into C), using leading dimensions to address sub-blocks
//! (`matmul_launch.rs`).
//!
//! # Scale and views
//! [`matmul_scaled`] computes `C = α·op(A)·op(B) [+ bias]` in the same pass (the kernel's
//! epilogue multiplies the sum by α), and [`MatView`] with [`matmul_view`] / [`matmul_into`]
//! reads A and B from, and writes or accumulates C into, column blocks of wider tensors through
//! the same leading dimensions and offsets (`matmul_view.rs`).
//!
//! # Groups
//! [`matmul_into_group`] runs g products of one shape over views (LoRA's q and v parts of one
//! Linear): one batched dispatch when each operand's views lie in one buffer at a constant
//! step (the kernels' batch strides, with the views' offsets and leading dimensions; step 0
//! for an operand shared by the group), one product after the other otherwise
//! (`matmul_group.rs`).
//!
//! # GELU epilogue
//! [`matmul_gelu`] writes `u = op(A)·op(B) + bias` and `g = gelu(u)` in one pass, and
//! [`matmul_gelu_backward`] `dU = (op(A)·op(B)) ⊙ gelu'(u)`: GPT-2's MLP without a GELU kernel
//! of its own, forward or backward (`matmul_gelu.rs`).

use std::mem::MaybeUninit;

use bytemuck::Zeroable;

use crate::gpu::{Kernel, kernel_params};
pub use crate::ops::matmul_tiled::{GpuMatmul, gpu_matmul, set_gpu_matmul};
use crate::sgemm::{Mat, sgemm};
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

/// Transpose flags of [`matmul`]: `op(A) = Aᵀ` when `trans_a`, `op(B) = Bᵀ` when `trans_b`.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct MatmulOpts {
    pub trans_a: bool,
    pub trans_b: bool,
}

kernel_params! {
    /// The `Params` struct of `matmul.wgsl`.
    struct Params {
        m: u32,
        n: u32,
        k: u32,
        trans_a: u32,
        trans_b: u32,
        lda: u32,
        ldb: u32,
        ldc: u32,
        off_a: u32,
        off_b: u32,
        off_c: u32,
        off_bias: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        has_bias: u32,
        accumulate: u32,
        alpha: f32,
        off_aux: u32,
        _pad2: u32,
    }
}

impl Params {
    /// The fields every dispatch of one product shares; the launch (`matmul_launch.rs`) fills
    /// in the views' offsets and the bias, and a split problem overrides the sizes of its
    /// sub-block.
    fn new(d: &Dims, o: MatmulOpts, accumulate: bool) -> Params {
        let ([lda, ldb, ldc], [pa, pb, pc]) = (d.ld, d.per_batch());
        Params {
            m: d.m as u32,
            n: d.n as u32,
            k: d.k as u32,
            trans_a: o.trans_a.into(),
            trans_b: o.trans_b.into(),
            lda: lda as u32,
            ldb: ldb as u32,
            ldc: ldc as u32,
            stride_a: pa as u32,
            stride_b: pb as u32,
            stride_c: pc as u32,
            accumulate: accumulate.into(),
            alpha: d.alpha,
            ..Zeroable::zeroed()
        }
    }
}

/// Output tile of one workgroup (`TM = TN` in the shader).
const TILE: usize = 64;

/// `shaders/matmul.wgsl`, the first kernel (the choice between it and `matmul_tiled.wgsl` is
/// [`matmul_tiled::pick`](crate::ops::matmul_tiled::pick)'s).
pub(crate) const TILE64: Kernel = Kernel {
    shader: "matmul",
    source: shaders::MATMUL,
    entry: "matmul",
};

/// The sizes of one (possibly batched) product after the shapes were checked, where its
/// operands lie in their tensors, and the scale α of the product.
#[derive(Clone, Debug)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    out_shape: Vec<usize>,
    /// Elements between stored rows of A, B and C ([`Dims::lds`] for whole tensors; the width
    /// of the wider tensor for a [`MatView`] column block).
    ld: [usize; 3],
    /// Element of A, B and C where the (first batch entry's) matrix starts.
    off: [usize; 3],
    /// Elements from one batch entry's matrix to the next in A, B and C ([`Dims::dense`] for
    /// whole tensors: 0 for a B shared by the batch; any step for a group,
    /// [`matmul_into_group`]).
    stride: [usize; 3],
    /// C = α·op(A)·op(B) (+ bias) (+ C).
    alpha: f32,
}

impl Dims {
    /// Elements from one batch entry's matrix to the next in A, B and C.
    fn per_batch(&self) -> [usize; 3] {
        self.stride
    }
    /// The batch strides of whole tensors: one matrix after the other, B's 0 when `b_shared`.
    fn dense(&self, b_shared: bool) -> [usize; 3] {
        let b = if b_shared { 0 } else { self.k * self.n };
        [self.m * self.k, b, self.m * self.n]
    }
    /// Elements one matrix of A, B and C spans from its first element to its last, inclusive,
    /// at the leading dimensions `ld`: `(rows − 1)·ld + cols` of its stored rows and columns
    /// (0 when it is empty).
    fn extents(&self, o: MatmulOpts) -> [usize; 3] {
        let (m, k, n) = (self.m, self.k, self.n);
        let stored = [
            if o.trans_a { (k, m) } else { (m, k) },
            if o.trans_b { (n, k) } else { (k, n) },
            (m, n),
        ];
        std::array::from_fn(|i| match stored[i] {
            (0, _) | (_, 0) => 0,
            (rows, cols) => (rows - 1) * self.ld[i] + cols,
        })
    }
    /// Elements between stored rows of A, B and C when each is a whole tensor.
    fn lds(&self, o: MatmulOpts) -> [usize; 3] {
        [
            if o.trans_a { self.m } else { self.k },
            if o.trans_b { self.k } else { self.n },
            self.n,
        ]
    }
}

fn dims(op: &'static str, a: &Tensor, b: &Tensor, o: MatmulOpts) -> Result<Dims> {
    let (sa, sb) = (a.shape(), b.shape());
    let a_form = if o.trans_a {
        "(…, K, M)"
    } else {
        "(…, M, K)"
    };
    let b_form = if o.trans_b {
        "(…, N, K)"
    } else {
        "(…, K, N)"
    };
    if sa.len() < 2 {
        return shape_err(op, format!("A of at least 2 dims {a_form}"), sa);
    }
    if sb.len() < 2 {
        return shape_err(op, format!("B of at least 2 dims {b_form}"), sb);
    }
    let (ra, rb) = (sa.len() - 2, sb.len() - 2);
    let (m, k) = if o.trans_a {
        (sa[ra + 1], sa[ra])
    } else {
        (sa[ra], sa[ra + 1])
    };
    let (kb, n) = if o.trans_b {
        (sb[rb + 1], sb[rb])
    } else {
        (sb[rb], sb[rb + 1])
    };
    if kb != k {
        return shape_err(
            op,
            format!("B {b_form} with K = {k} to match A {a_form} of shape {sa:?}"),
            sb,
        );
    }
    let b_shared = rb == 0;
    if !b_shared && sa[..ra] != sb[..rb] {
        return shape_err(
            op,
            format!("B 2-D or with the batch dims {:?} of A {sa:?}", &sa[..ra]),
            sb,
        );
    }
    let mut out_shape = sa[..ra].to_vec();
    out_shape.extend([m, n]);
    let batch: usize = sa[..ra].iter().product();
    let mut d = Dims {
        batch,
        m,
        k,
        n,
        out_shape,
        ld: [0; 3],
        off: [0; 3],
        stride: [0; 3],
        alpha: 1.0,
    };
    if b_shared && !o.trans_a {
        // A (batch, M, K) is one (batch·M, K) matrix: one 2-D product instead of `batch` of them.
        d.m *= d.batch;
        d.batch = 1;
    }
    d.ld = d.lds(o);
    d.stride = d.dense(b_shared);
    Ok(d)
}

fn check_bias(op: &'static str, bias: Option<&Tensor>, n: usize) -> Result<()> {
    match bias {
        Some(t) if t.shape() != [n] => shape_err(op, format!("bias of shape [{n}] (N)"), t.shape()),
        _ => Ok(()),
    }
}

/// `C = op(A)·op(B) [+ bias]`. A: `(…, M, K)` or `(…, K, M)` if `trans_a`; B: `(…, K, N)` or
/// `(…, N, K)` if `trans_b`, or 2-D (shared across the batch); bias: `(N)`, added to every row.
/// Leading (batch) dims of A and B equal, or B 2-D. Returns `(…, M, N)`. The backward rules
/// (dA, dB through the transpose flags) are in the module documentation.
pub fn matmul(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, opts: MatmulOpts) -> Result<Tensor> {
    matmul_scaled(a, b, bias, opts, 1.0)
}

/// `C = α·op(A)·op(B) [+ bias]`: [`matmul`] with the product scaled by α in the same pass (the
/// bias is not scaled). The gradients are α times those of [`matmul`]'s table.
pub fn matmul_scaled(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    opts: MatmulOpts,
    alpha: f32,
) -> Result<Tensor> {
    let _profile = crate::profile::scope("matmul");
    let mut d = dims("matmul", a, b, opts)?;
    d.alpha = alpha;
    check_bias("matmul", bias, d.n)?;
    let mut all = vec![a, b];
    all.extend(bias);
    let device = same_device("matmul", &all)?;
    crate::counts::matmul(d.batch, d.m, d.n, d.k, opts.trans_a, opts.trans_b);
    if let Device::Cpu(ctx) = &device {
        // C is written whole by sgemm (β = 0, or β = 1 over the bias rows written first), so
        // it is not zero-filled first: that memset was a twentieth of a small model's step.
        let mut c: Vec<MaybeUninit<f32>> = crate::tensor::reserved(ctx, &d.out_shape)?;
        let numel = d.out_shape.iter().product();
        // SAFETY: MaybeUninit needs no initialisation, and room for numel was reserved above.
        unsafe { c.set_len(numel) };
        let (ad, bd) = (a.cpu_data()?, b.cpu_data()?);
        let biasd = bias.map(|t| t.cpu_data()).transpose()?;
        sgemm_cpu(
            &ad,
            &bd,
            biasd.as_deref().map(|v| v.as_slice()),
            &mut c,
            &d,
            opts,
            false,
        );
        // SAFETY: sgemm_cpu initialised every element (see above); MaybeUninit<f32> and f32
        // have the same layout, so the allocation is a valid Vec<f32> of the same length.
        let c = unsafe {
            let mut c = std::mem::ManuallyDrop::new(c);
            Vec::from_raw_parts(c.as_mut_ptr().cast::<f32>(), c.len(), c.capacity())
        };
        return Ok(Tensor::cpu_from(ctx, c, &d.out_shape));
    }
    let c = Tensor::uninit(&d.out_shape, &device)?;
    run(&device, &c, a, b, bias, &d, opts, false)?;
    Ok(c)
}

/// In place: `C += op(A)·op(B)`, in one pass over C (no temporary product). C must have the
/// result's shape and must not share storage with A or B.
pub fn matmul_accumulate(c: &Tensor, a: &Tensor, b: &Tensor, opts: MatmulOpts) -> Result<()> {
    let _profile = crate::profile::scope("matmul");
    let d = dims("matmul_accumulate", a, b, opts)?;
    if c.shape() != d.out_shape {
        return shape_err(
            "matmul_accumulate",
            format!("C of the product's shape {:?}", d.out_shape),
            c.shape(),
        );
    }
    if c.same_storage(a) || c.same_storage(b) {
        return Err(Error::Invalid(
            "matmul_accumulate: C must not share storage with A or B".into(),
        ));
    }
    let device = same_device("matmul_accumulate", &[c, a, b])?;
    crate::counts::matmul(d.batch, d.m, d.n, d.k, opts.trans_a, opts.trans_b);
    run(&device, c, a, b, None, &d, opts, true)
}

#[allow(clippy::too_many_arguments)]
fn run(
    device: &Device,
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    d: &Dims,
    o: MatmulOpts,
    accumulate: bool,
) -> Result<()> {
    match device {
        Device::Cpu(_) => {
            let (ad, bd) = (a.cpu_data()?, b.cpu_data()?);
            let biasd = bias.map(|t| t.cpu_data()).transpose()?;
            let mut cd = c.cpu_data_mut()?;
            // SAFETY: f32 and MaybeUninit<f32> have the same layout, and sgemm_cpu only writes
            // initialised values.
            let cd = unsafe {
                std::slice::from_raw_parts_mut(cd.as_mut_ptr().cast::<MaybeUninit<f32>>(), cd.len())
            };
            sgemm_cpu(
                &ad,
                &bd,
                biasd.as_deref().map(|v| v.as_slice()),
                cd,
                d,
                o,
                accumulate,
            );
            Ok(())
        }
        Device::Gpu(ctx) => {
            let max_z = ctx.limits.max_compute_workgroups_per_dimension as usize;
            launch(ctx, c, a, b, bias, d, o, accumulate, max_z, None)
        }
    }
}

/// The CPU path: one `sgemm` per batch entry. The strides encode the transposes; bias and
/// accumulation come in through C's initial value and `beta = 1`. Without either, C may be
/// uninitialised: sgemm with β = 0 writes every element without reading it.
fn sgemm_cpu(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c: &mut [MaybeUninit<f32>],
    d: &Dims,
    o: MatmulOpts,
    accumulate: bool,
) {
    let (m, k, n) = (d.m, d.k, d.n);
    if n == 0 || m == 0 {
        return;
    }
    let [pa, pb, pc] = d.per_batch();
    let [lda, ldb, ldc] = d.ld;
    let [oa, ob, oc] = d.off;
    let (rsa, csa) = if o.trans_a { (1, lda) } else { (lda, 1) };
    let (rsb, csb) = if o.trans_b { (1, ldb) } else { (ldb, 1) };
    if let Some(bias) = bias {
        debug_assert!(ldc == n && oc == 0, "a bias needs C whole");
        for row in c.chunks_mut(n) {
            for (o, &b) in row.iter_mut().zip(bias) {
                o.write(b);
            }
        }
    }
    let beta = if accumulate || bias.is_some() {
        1.0
    } else {
        0.0
    };
    // One batch entry into its slice of C; `parallel`: the library may use every thread.
    let one = |z: usize, cz: &mut [MaybeUninit<f32>], parallel: bool| {
        // SAFETY: the shapes (and a view's columns) were checked, so a[oa + z·pa..] and
        // b[ob + z·pb..] hold one full batch entry at these strides, and cz is that entry's
        // block of C (m rows of ldc, n columns used), borrowed mutably.
        unsafe {
            sgemm(
                m,
                k,
                n,
                d.alpha,
                Mat {
                    ptr: a.as_ptr().add(oa + z * pa),
                    rs: rsa,
                    cs: csa,
                },
                Mat {
                    ptr: b.as_ptr().add(ob + z * pb),
                    rs: rsb,
                    cs: csb,
                },
                beta,
                Mat {
                    ptr: cz.as_mut_ptr().cast::<f32>(),
                    rs: ldc,
                    cs: 1,
                },
                parallel,
            );
        }
    };
    // The libraries run a product this small on one thread (their own size heuristics), so a
    // batch of them (per-head products) is spread over the threads here instead.
    let small = m * k + k * n < SMALL_GEMM;
    let threads = crate::cpu::threads();
    if d.batch >= 2 && threads > 1 && small {
        let per = d.batch.div_ceil(threads);
        rayon::in_place_scope(|s| {
            for (i, chunk) in c.chunks_mut(per * pc).enumerate() {
                let one = &one;
                s.spawn(move |_| {
                    for (j, cz) in chunk.chunks_mut(pc).enumerate() {
                        one(i * per + j, cz, false);
                    }
                });
            }
        });
    } else if d.batch == 1 {
        // The only case with a C view: C's block starts `oc` elements in.
        one(0, &mut c[oc..], true);
    } else {
        for (z, cz) in c.chunks_mut(pc).enumerate().take(d.batch) {
            one(z, cz, true);
        }
    }
}

/// Below this `m·k + k·n`, matrixmultiply keeps a product on one thread (its heuristic on x86:
/// one thread per 2¹⁴ of `m·k + k·n`; gemm's is one below m·k·n = 48·48·256); batches of such
/// products are split over threads by batch entry.
const SMALL_GEMM: usize = 1 << 15;

/// The product `matmul(a, b, bias, opts)` asks for, checked as [`matmul`] checks it:
/// `[batch, m, k, n]` (batch entries not folded into rows) and C's shape. For
/// [`reference::matmul_tensors`](crate::reference::matmul_tensors).
pub(crate) fn problem(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    opts: MatmulOpts,
) -> Result<([usize; 4], Vec<usize>)> {
    let d = dims(op, a, b, opts)?;
    check_bias(op, bias, d.n)?;
    let rank = d.out_shape.len();
    let batch = d.out_shape[..rank - 2].iter().product();
    Ok(([batch, d.out_shape[rank - 2], d.k, d.n], d.out_shape))
}

#[path = "matmul_launch.rs"]
mod launch;
use launch::launch;
pub(crate) use launch::launch_f16;

#[path = "matmul_splitk.rs"]
pub(crate) mod splitk;

#[path = "matmul_view.rs"]
mod view;
pub use view::{MatView, matmul_into, matmul_view};

#[path = "matmul_group.rs"]
mod group;
pub use group::{group_outputs, matmul_into_group};

#[path = "matmul_gelu.rs"]
mod gelu;
pub(crate) use gelu::Epilogue;
pub use gelu::{matmul_gelu, matmul_gelu_backward};

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
