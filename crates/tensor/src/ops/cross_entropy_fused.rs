//! Cross-entropy's loss and its gradient in one pass, the gradient written over the logits.
//!
//! Math, for logits x: (N, V), targets t_n < V and weights w_n (as in
//! [`cross_entropy`](super::cross_entropy)):
//! - `losses[n] = w_n · (logsumexp(x_n) − x[n, t_n])`;
//! - `grad[n, v] = w_n · (softmax(x_n)[v] − [v = t_n]) = ∂losses[n]/∂x[n, v]`.
//!
//! Why one op: in training, the logits of the output layer are needed for nothing but the loss
//! and its gradient, and with GPT-2's 50,257-token vocabulary they are the largest tensor of a
//! step. Computing both in one pass reads the logits once, evaluates each exponential once
//! (the separate forward and backward evaluate them twice), and stores the gradient in the
//! logits' own memory instead of a second buffer of the same size. The caller scales the
//! gradient by the upstream gradient and `1/Σw` later; the loss is linear in neither, but
//! the gradient of the *mean* loss is this one times a scalar.
//!
//! The op takes the logits by value: when no other handle to their storage exists (the usual
//! case, a fresh matmul output), it is reused for the gradient; otherwise it is copied first,
//! so no other tensor ever sees its values change.
//!
//! [`cross_entropy_fused_rows`] is the same op over a row block `row0..row0 + rows` of a larger
//! problem of N rows, whose targets, weights and (N) losses a [`LossRows`] holds: the block's
//! losses go into its elements of that one tensor, so a caller that cuts the logits into chunks
//! (autograd's `linear_cross_entropy`, which never holds all N·V of them; [`loss_chunk_rows`]
//! says how many rows a chunk has) sums them once, without a concat, and a GPU gets the targets
//! and weights in one upload, not one per chunk (an upload ends the batch of recorded passes).
//!
//! Kernel: `shaders/cross_entropy_fused.wgsl`, one 256-invocation workgroup per row: a max and
//! a sum-of-exponentials tree reduction, then each invocation rewrites its own elements.
//! CPU: per row, the vectorised [`fastmath`] max and exp-and-sum (which leaves
//! exp(x − m) in the row), then one scaling pass.

use crate::gpu::{Kernel, grid_2d, kernel_params};
use crate::ops::cross_entropy::check;
use crate::{Device, Result, Tensor, fastmath, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `cross_entropy_fused.wgsl`.
    struct Params {
        rows: u32,
        cols: u32,
        off_x: u32,
        off_targets: u32,
        off_weights: u32,
        off_losses: u32,
        _pad0: u32,
        _pad1: u32,
    }
}

const KERNEL: Kernel = Kernel {
    shader: "cross_entropy_fused",
    source: shaders::CROSS_ENTROPY_FUSED,
    entry: "cross_entropy_fused",
};

/// Per-row losses (N) and the gradient (shaped like `logits`, in their storage when it is not
/// shared); see the module doc.
pub fn cross_entropy_fused(
    logits: Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<(Tensor, Tensor)> {
    let _profile = crate::profile::scope("loss");
    check("cross_entropy_fused", &logits, targets, weights)?;
    let rows = LossRows::new(targets, weights, &logits.device())?;
    let grad = cross_entropy_fused_rows(logits, &rows, 0)?;
    Ok((rows.into_losses(), grad))
}

/// The N rows of a loss that [`cross_entropy_fused_rows`] computes a block at a time: their
/// targets and weights (uploaded once on a GPU) and the (N) per-row losses the blocks write.
pub struct LossRows<'a> {
    targets: &'a [u32],
    weights: &'a [f32],
    /// The targets (as u32 bits) and weights on the GPU; `None` on the CPU.
    uploaded: Option<(Tensor, Tensor)>,
    losses: Tensor,
}

impl<'a> LossRows<'a> {
    /// N = `targets.len()` rows on `device`; the losses are undefined until every row's block
    /// was computed.
    pub fn new(targets: &'a [u32], weights: &'a [f32], device: &Device) -> Result<LossRows<'a>> {
        let n = targets.len();
        if weights.len() != n {
            return shape_err(
                "cross_entropy_fused",
                format!("{n} weights, one per target"),
                format_args!("{} weights", weights.len()),
            );
        }
        let losses = Tensor::uninit(&[n], device)?;
        let uploaded = match device {
            Device::Gpu(_) if n > 0 => Some((
                Tensor::from_u32(targets, device)?,
                Tensor::from_vec(weights.to_vec(), &[n], device)?,
            )),
            _ => None,
        };
        Ok(LossRows {
            targets,
            weights,
            uploaded,
            losses,
        })
    }

    /// The (N) per-row losses.
    pub fn losses(&self) -> &Tensor {
        &self.losses
    }

    /// The (N) per-row losses, the rows' other data dropped.
    pub fn into_losses(self) -> Tensor {
        self.losses
    }
}

/// [`cross_entropy_fused`] of the rows `row0..row0 + r` of the problem of `rows`: `logits` are
/// those rows (r, V); `losses[row0 + i] = w·(logsumexp − x[t])` of row i is written into
/// `rows`' losses, and the gradient is returned (in the logits' storage when it is not shared).
pub fn cross_entropy_fused_rows(logits: Tensor, rows: &LossRows, row0: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("loss");
    let op = "cross_entropy_fused";
    let total = rows.targets.len();
    let r = logits.numel() / logits.last_dim().max(1);
    if row0 + r > total {
        return shape_err(
            op,
            format!("a block of logits inside the {total} rows of the loss"),
            format_args!("rows {row0}..{} (logits {:?})", row0 + r, logits.shape()),
        );
    }
    let (targets, weights) = (&rows.targets[row0..row0 + r], &rows.weights[row0..row0 + r]);
    let (n, v) = check(op, &logits, targets, weights)?;
    crate::tensor::same_device(op, &[&logits, &rows.losses])?;
    let x = if logits.is_exclusive() {
        logits
    } else {
        logits.copy()?
    };
    match x.device() {
        Device::Cpu(_) => {
            {
                let mut data = x.cpu_data_mut()?;
                let mut losses = rows.losses.cpu_data_mut()?;
                let out = &mut losses[row0..row0 + n];
                crate::cpu::for_row_pairs(&mut data, v, out, 1, |r, row, loss| {
                    loss[0] = grad_row(row, targets[r] as usize, weights[r]);
                });
            }
            Ok(x)
        }
        Device::Gpu(ctx) => {
            let Some((tg, wt)) = &rows.uploaded else {
                return Ok(x);
            };
            if n == 0 {
                return Ok(x);
            }
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            for (r0, rows_here) in ctx.row_chunks(n, &[v, 1])? {
                let xs = ctx.view(&x, r0 * v, rows_here * v)?;
                let t = ctx.view(tg, row0 + r0, rows_here)?;
                let w = ctx.view(wt, row0 + r0, rows_here)?;
                let l = ctx.view(&rows.losses, row0 + r0, rows_here)?;
                let params = Params {
                    rows: rows_here as u32,
                    cols: v as u32,
                    off_x: xs.offset,
                    off_targets: t.offset,
                    off_weights: w.offset,
                    off_losses: l.offset,
                    _pad0: 0,
                    _pad1: 0,
                };
                ctx.dispatch(
                    KERNEL,
                    bytemuck::bytes_of(&params),
                    &[
                        (1, xs.binding),
                        (2, t.binding),
                        (3, w.binding),
                        (4, l.binding),
                    ],
                    grid_2d(rows_here, 1, max),
                )?;
            }
            Ok(x)
        }
    }
}

/// Logits, in bytes, that one chunk of a chunked loss may hold on the CPU: see
/// [`loss_chunk_rows`].
pub const CPU_CHUNK_BYTES: usize = 256 << 20;

/// How many rows of (rows, V) logits one chunk of a chunked loss (logits, then
/// [`cross_entropy_fused_rows`], then the gradients' products) should hold, so that at most
/// one chunk's logits exist at a time. At least 1.
///
/// - GPU: the most rows whose logits fit one storage binding (`max_storage_buffer_binding_size`
///   less the offset alignment, as the ops' own row chunks count it), rounded down to a
///   multiple of 4 as the matmul rounds its row chunks. The whole-problem ops
///   would cut their dispatches at these rows anyway (the logits matmul, the loss kernel and
///   the products of the gradient each bind at most a binding of logits rows), so chunking adds
///   no dispatch: 664 rows of GPT-2's 50,257-token vocabulary under 128 MiB, 13 chunks for
///   8,192 rows, as the unchunked ops dispatched 13 row blocks.
/// - CPU: [`CPU_CHUNK_BYTES`] (256 MiB) of logits, 1,335 rows of GPT-2's vocabulary: the
///   temporary is bounded (instead of N·V floats, 1.57 GiB for 8,192 rows), and the batches a
///   CPU trains (GPT-2 124M at 4×256, 1,024 rows; every small model) stay one chunk, the
///   unchunked path. With 64 MiB (333 rows) a 124M step at 4×256 spent about 80 ms (3 %) more
///   in the logits' products (`train bench ops --model 124m --bt 4x256`), cut into 4.
pub fn loss_chunk_rows(device: &Device, v: usize) -> usize {
    let row_bytes = v.max(1) * 4;
    let rows = match device {
        Device::Cpu(_) => CPU_CHUNK_BYTES / row_bytes,
        Device::Gpu(ctx) => {
            let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
            let room = ctx.max_binding_bytes().saturating_sub(align) / 4;
            let rows = (room / v.max(1) as u64) as usize;
            if rows >= 4 { rows - rows % 4 } else { rows }
        }
    };
    rows.max(1)
}

/// One row: returns its loss and leaves `w·(softmax − onehot(t))` in `row`.
fn grad_row(row: &mut [f32], t: usize, w: f32) -> f32 {
    if w == 0.0 {
        row.fill(0.0);
        return 0.0;
    }
    let xt = row[t];
    let m = fastmath::max(row);
    let s = fastmath::exp_sub_sum(row, m);
    fastmath::scale(row, (w as f64 / s) as f32);
    row[t] -= w;
    w * ((m - xt) + (s as f32).ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy::cross_entropy;
    use crate::reference;
    use crate::testing::{assert_close_slices, gpu, gpu_with_binding_limit, random_vec, sizes};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Random logits of (n, v) spread over ±4·amp, targets, and weights with some zeros.
    fn case(n: usize, v: usize, amp: f32, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = random_vec(n * v, seed)
            .into_iter()
            .map(|e| e * 4.0 * amp)
            .collect();
        let t = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let w = (0..n)
            .map(|i| {
                if i % 3 == 1 {
                    0.0
                } else {
                    rng.random_range(0.5..2.0)
                }
            })
            .collect();
        (x, t, w)
    }

    /// Losses and gradient in f64 (`tensor::reference`), the truth the op is held to.
    fn f64_reference(x: &[f32], t: &[u32], w: &[f32], v: usize) -> (Vec<f32>, Vec<f32>) {
        let (x, w) = (reference::widen(x), reference::widen(w));
        (
            reference::narrow(&reference::cross_entropy_losses(&x, v, t, &w)),
            reference::narrow(&reference::cross_entropy_dlogits(&x, v, t, &w)),
        )
    }

    /// The fused op on `d` against the f64 reference, and on the CPU against the separate
    /// forward's losses. (Not against the separate backward's gradient: it recomputes the
    /// softmax as exp(x − lse) with lse rounded to f32, so where the target's probability is
    /// near 1 its w·(p − 1) carries the rounding of lse, up to a few percent; the fused op
    /// forms p from exp(x − m)/s and stays within 1e-6.)
    fn check_against_reference(d: &Device, n: usize, v: usize, amp: f32, seed: u64) {
        let (x, t, w) = case(n, v, amp, seed);
        let (want_losses, want_grad) = f64_reference(&x, &t, &w, v);
        let logits = Tensor::from_vec(x, &[n, v], d).unwrap();
        let unfused = cross_entropy(&logits, &t, &w).unwrap();
        let (losses, grad) = cross_entropy_fused(logits.clone(), &t, &w).unwrap();
        assert!(
            !grad.same_storage(&logits),
            "a shared input is copied, not overwritten"
        );
        let losses = losses.to_vec().unwrap();
        // Losses are O(log V + 8·amp): relative 1e-5.
        assert_close_slices("losses", &losses, &want_losses, 1e-5, 1e-5);
        assert_close_slices(
            "losses vs unfused",
            &losses,
            &unfused.losses.to_vec().unwrap(),
            1e-5,
            1e-5,
        );
        // Gradient elements are differences of probabilities (≤ 1 in size): absolute 1e-6.
        assert_close_slices("grad", &grad.to_vec().unwrap(), &want_grad, 1e-6, 0.0);
    }

    #[test]
    fn cross_entropy_fused_reuses_exclusive_storage() {
        let d = Device::cpu();
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0], &[2, 3], &d).unwrap();
        let before = x.clone();
        drop(before);
        let (losses, g) = cross_entropy_fused(x, &[2, 0], &[1.0, 0.5]).unwrap();
        let l = losses.to_vec().unwrap();
        // Row 0: logsumexp(1,2,3) − 3 = log(e⁻² + e⁻¹ + 1); row 1: 0.5·log 3.
        let l0 = ((-2.0f64).exp() + (-1.0f64).exp() + 1.0).ln();
        assert!((l[0] as f64 - l0).abs() < 1e-6 && (l[1] as f64 - 0.5 * 3f64.ln()).abs() < 1e-6);
        let g = g.to_vec().unwrap();
        assert!((g[2] as f64 - (1.0 / (1.0 + (-1f64).exp() + (-2f64).exp()) - 1.0)).abs() < 1e-6);
        assert!((g[3] - 0.5 * (1.0 / 3.0 - 1.0)).abs() < 1e-6 && (g[4] - 0.5 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_fused_matches_f64_large_vocab() {
        check_against_reference(&Device::cpu(), 5, 50257, 1.0, 3);
    }

    #[test]
    fn cross_entropy_fused_rejects_bad_targets() {
        let d = Device::cpu();
        let x = Tensor::zeros(&[2, 4], &d).unwrap();
        let e = cross_entropy_fused(x, &[0, 4], &[1.0, 1.0]).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn cross_entropy_fused_matches_cpu_split_bindings() {
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        // 7 rows of 300 floats: a row range per 3 rows under a 4 KiB binding.
        let (x, t, w) = case(7, 300, 1.0, 9);
        let cpu = cross_entropy_fused(
            Tensor::from_vec(x.clone(), &[7, 300], &Device::cpu()).unwrap(),
            &t,
            &w,
        )
        .unwrap();
        let gpu = cross_entropy_fused(Tensor::from_vec(x, &[7, 300], &g).unwrap(), &t, &w).unwrap();
        assert_close_slices(
            "losses",
            &gpu.0.to_vec().unwrap(),
            &cpu.0.to_vec().unwrap(),
            1e-5,
            1e-5,
        );
        assert_close_slices(
            "grad",
            &gpu.1.to_vec().unwrap(),
            &cpu.1.to_vec().unwrap(),
            1e-6,
            1e-4,
        );
    }

    /// Row blocks through [`cross_entropy_fused_rows`] give the whole op's losses (in one (N)
    /// tensor) and gradient rows, bit for bit: every row is computed alone, on either device.
    fn row_blocks_match_whole(d: &Device) {
        let (n, v, block) = (11, 37, 4);
        let (x, t, w) = case(n, v, 2.0, 5);
        let (want_losses, want_grad) =
            cross_entropy_fused(Tensor::from_vec(x.clone(), &[n, v], d).unwrap(), &t, &w).unwrap();
        let rows = LossRows::new(&t, &w, d).unwrap();
        let mut grad = Vec::new();
        // Out of order: each block writes only its own losses.
        for r0 in (0..n).step_by(block).rev() {
            let r = block.min(n - r0);
            let xs = x[r0 * v..(r0 + r) * v].to_vec();
            let logits = Tensor::from_vec(xs, &[r, v], d).unwrap();
            let g = cross_entropy_fused_rows(logits, &rows, r0).unwrap();
            grad.splice(0..0, g.to_vec().unwrap());
        }
        assert_eq!(
            rows.losses().to_vec().unwrap(),
            want_losses.to_vec().unwrap()
        );
        assert_eq!(grad, want_grad.to_vec().unwrap());
    }
    crate::on_devices!(
        row_blocks_match_whole,
        cross_entropy_fused_rows_match_whole_cpu,
        cross_entropy_fused_rows_match_whole_gpu
    );

    #[test]
    fn cross_entropy_fused_rows_checks_the_block() {
        let d = Device::cpu();
        let x = || Tensor::zeros(&[2, 4], &d).unwrap();
        let (t, w) = ([0, 1, 2], [1.0; 3]);
        let rows = LossRows::new(&t, &w, &d).unwrap();
        let e = cross_entropy_fused_rows(x(), &rows, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("inside the 3 rows") && e.contains("rows 2..4"),
            "{e}"
        );
        let e = LossRows::new(&t, &w[..2], &d).err().unwrap().to_string();
        assert!(e.contains("3 weights") && e.contains("2 weights"), "{e}");
        let (t, w) = ([0, 4, 2], [1.0; 3]);
        let rows = LossRows::new(&t, &w, &d).unwrap();
        let e = cross_entropy_fused_rows(x(), &rows, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn loss_chunk_rows_fit_the_budget() {
        // CPU: 256 MiB of logits, 1,335 rows of GPT-2's vocabulary; never 0 rows.
        assert_eq!(loss_chunk_rows(&Device::cpu(), 50257), 1335);
        assert_eq!(loss_chunk_rows(&Device::cpu(), usize::MAX / 8), 1);
        let Some(_) = gpu() else { return };
        // GPU: (4096 − alignment)/4 = 960 to 1,020 floats of room: 9 or 10 rows of 100 → 8 (a
        // multiple of 4), 3 of 300 → 3 (under 4, kept); a row that does not fit still makes a
        // chunk of 1.
        let g = gpu_with_binding_limit(4096);
        assert_eq!(loss_chunk_rows(&g, 100), 8);
        assert_eq!(loss_chunk_rows(&g, 300), 3);
        assert_eq!(loss_chunk_rows(&g, 2000), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn cross_entropy_fused_matches_f64(n in sizes(), v in sizes(), amp in 0.1f32..20.0, seed in 0u64..1000) {
            check_against_reference(&Device::cpu(), n, v, amp, seed);
            if let Some(g) = gpu() {
                check_against_reference(&g, n, v, amp, seed);
                let (x, t, w) = case(n, v, amp, seed);
                let cpu = cross_entropy_fused(Tensor::from_vec(x.clone(), &[n, v], &Device::cpu()).unwrap(), &t, &w).unwrap();
                let gpu = cross_entropy_fused(Tensor::from_vec(x, &[n, v], &g).unwrap(), &t, &w).unwrap();
                assert_close_slices("losses", &gpu.0.to_vec().unwrap(), &cpu.0.to_vec().unwrap(), 1e-5, 1e-5);
                assert_close_slices("grad", &gpu.1.to_vec().unwrap(), &cpu.1.to_vec().unwrap(), 1e-6, 1e-4);
            }
        }
    }
}
