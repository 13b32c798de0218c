//! Mean cross-entropy with per-token weights:
//! `loss = Σ_n w_n·(logsumexp(x_n) − x_n[t_n]) / Σ_n w_n`, x: (N, V) logits.
//!
//! Tokens with w = 0 do not count (the prompt of a fine-tuning example). Saved: the logits and
//! the per-row logsumexp; backward: `dx[n, v] = dloss·w_n/Σw·(softmax(x_n)[v] − [v = t_n])`.
//!
//! [`Tape::linear_cross_entropy`] is the same loss of the logits h·Wᵀ of an output layer, fused so that
//! the (N, V) logits never outlive the forward: with G = ∂(Σ_n w_n·l_n)/∂logits (one pass of
//! [`cross_entropy_fused`], written over the logits), the gradients are dh = G·W and
//! dW = Gᵀ·h, both linear in the upstream dloss, so the forward computes them at once and the
//! backward only scales them by dloss/Σw. What stays saved until the backward is dh (N, C) and,
//! when W is trainable, dW (V, C): for GPT-2's tied 50,257-token head that is a few hundred KB
//! instead of the logits' N·V floats (100 MB for 500 rows).
//!
//! Nor do all N rows of logits exist at once: the rows are taken in chunks of R
//! ([`loss_chunk_rows`]: on a GPU the most whose logits fit one storage binding, on the CPU
//! 256 MiB of logits), and for each row range [r0, r0 + R):
//!
//! ```text
//! logits_c        = h[r0..]·Wᵀ                          (R, V), the only logits alive
//! losses[r0..], G = cross_entropy_fused_rows(logits_c)    G over logits_c; losses: one (N) tensor
//! dh[r0..]        = G·W                                  written into dh's row block, in place
//! dW             += Gᵀ·h[r0..]                           (= on the first chunk)
//! loss            = (1/Σw)·Σ_n losses[n]                  once, over all rows
//! ```
//!
//! The row blocks of h and dh are [`MatView`] row ranges (no copy), Σw is global, and a problem
//! of at most R rows takes the unchunked ops: the whole product, the fused loss, the two
//! gradient products (the default run's 4,096-token model has at most 16 × 128 rows, 32 MiB of
//! logits, so its CPU results are those of the unchunked op, bit for bit). GPT-2 124M at 8 × 1,024
//! tokens held 1.57 GiB of logits at the forward's peak; chunked on a GPU with 128 MiB bindings
//! it holds 13 chunks of 664 rows one at a time (133 MB), in as many dispatches as before (every
//! unchunked op already cut its passes at those rows).
//!
//! The glue is folded: the loss is one [`sum_all_scaled`] (the f32 sum times 1/Σw, as
//! `scale(sum_all(..))` was, in one dispatch), and on the GPU the backward scales each saved
//! gradient by `inv·dloss` in one [`scale_by`] pass (dloss stays on the device).

use tensor::ops::cross_entropy::{cross_entropy, cross_entropy_backward};
use tensor::ops::cross_entropy_fused::{
    LossRows, cross_entropy_fused, cross_entropy_fused_rows, loss_chunk_rows,
};
use tensor::ops::elementwise::{scale, scale_by};
use tensor::ops::matmul::{MatView, MatmulOpts, matmul, matmul_into, matmul_view};
use tensor::ops::reduce::sum_all_scaled;
use tensor::{Device, Error, Result, Tensor};

use crate::tape::{Tape, Var};

/// 1/Σw, or an error when no token counts.
fn inverse_total(op: &str, weights: &[f32]) -> Result<f32> {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    if total <= 0.0 {
        return Err(Error::Invalid(format!(
            "{op}: the weights of {} tokens sum to {total}; at least one token must count",
            weights.len()
        )));
    }
    Ok((1.0 / total) as f32)
}

/// `g · (k · dloss)` for a (1) upstream gradient `dloss`: folded into one scale on the CPU
/// (where reading dloss is free), one [`scale_by`] pass on the GPU (no host round trip).
fn scale_by_upstream(g: &Tensor, k: f32, dloss: &Tensor) -> Result<Tensor> {
    match dloss.device() {
        Device::Cpu(_) => scale(g, k * dloss.to_vec()?[0]),
        Device::Gpu(_) => scale_by(g, k, dloss),
    }
}

const TRANS_A: MatmulOpts = MatmulOpts {
    trans_a: true,
    trans_b: false,
};
const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// `(N, V)` of h: (N, C) and W: (V, C), with one target and one weight per row.
fn check_linear(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<(usize, usize)> {
    let op = "linear_cross_entropy";
    let (n, v) = match (h.shape(), w.shape()) {
        (&[n, c], &[v, cw]) if c == cw => (n, v),
        (hs, ws) => {
            return Err(Error::Shape {
                op,
                expected: "h of shape (N, C) and W of shape (V, C), one C".into(),
                found: format!("h {hs:?} and W {ws:?}"),
            });
        }
    };
    if targets.len() != n || weights.len() != n {
        return Err(Error::Shape {
            op,
            expected: format!("{n} targets and {n} weights, one per row of h"),
            found: format!("{} targets and {} weights", targets.len(), weights.len()),
        });
    }
    Ok((n, v))
}

/// The per-row losses (N) of the logits h·Wᵀ, and the unscaled gradients dh = G·W (N, C) and
/// dW = Gᵀ·h (V, C) where `want` = (dh, dW) asks for them, computed `chunk` rows at a time
/// (module doc); at most `chunk` rows of logits exist at once.
fn fused_rows(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    weights: &[f32],
    (want_dh, want_dw): (bool, bool),
    chunk: usize,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let n = h.shape()[0];
    if n <= chunk {
        // One chunk: the whole problem in the unchunked ops and order.
        let logits = matmul(h, w, None, TRANS_B)?;
        let (losses, g) = cross_entropy_fused(logits, targets, weights)?;
        let dh = want_dh
            .then(|| matmul(&g, w, None, MatmulOpts::default()))
            .transpose()?;
        let dw = want_dw.then(|| matmul(&g, h, None, TRANS_A)).transpose()?;
        return Ok((losses, dh, dw));
    }
    let device = h.device();
    let rows = LossRows::new(targets, weights, &device)?;
    let dh = want_dh
        .then(|| Tensor::uninit(h.shape(), &device))
        .transpose()?;
    let mut dw = None;
    for r0 in (0..n).step_by(chunk.max(1)) {
        let r = chunk.min(n - r0);
        let hc = MatView::all(h).rows(r0, r);
        let logits = matmul_view(hc, MatView::all(w), TRANS_B, 1.0)?;
        let g = cross_entropy_fused_rows(logits, &rows, r0)?;
        if let Some(dh) = &dh {
            let block = MatView::all(dh).rows(r0, r);
            let (gv, wv) = (MatView::all(&g), MatView::all(w));
            matmul_into(block, gv, wv, MatmulOpts::default(), 1.0, false)?;
        }
        if want_dw {
            match &dw {
                Some(acc) => {
                    matmul_into(MatView::all(acc), MatView::all(&g), hc, TRANS_A, 1.0, true)?
                }
                None => dw = Some(matmul_view(MatView::all(&g), hc, TRANS_A, 1.0)?),
            }
        }
    }
    Ok((rows.into_losses(), dh, dw))
}

impl Tape {
    /// Weighted mean cross-entropy of the logits `h·Wᵀ` of an output layer, h: (N, C),
    /// W: (V, C); a (1) loss. The logits are never kept, nor held for more than one chunk of
    /// rows at a time (module doc).
    pub fn linear_cross_entropy(
        &self,
        h: &Var,
        w: &Var,
        targets: &[u32],
        weights: &[f32],
    ) -> Result<Var> {
        let (_, v) = check_linear(&h.value, &w.value, targets, weights)?;
        let chunk = loss_chunk_rows(&h.value.device(), v);
        self.linear_cross_entropy_chunked(h, w, targets, weights, chunk)
    }

    /// [`Tape::linear_cross_entropy`] with `chunk` rows of logits at a time (tests force small
    /// chunks here).
    pub(crate) fn linear_cross_entropy_chunked(
        &self,
        h: &Var,
        w: &Var,
        targets: &[u32],
        weights: &[f32],
        chunk: usize,
    ) -> Result<Var> {
        let (n, _) = check_linear(&h.value, &w.value, targets, weights)?;
        let inv = inverse_total("linear_cross_entropy", weights)?;
        let grads = self.is_recording() && (h.requires_grad || w.requires_grad);
        if !grads && n <= chunk {
            // No gradient and one chunk: the plain forward.
            let logits = matmul(&h.value, &w.value, None, TRANS_B)?;
            let out = cross_entropy(&logits, targets, weights)?;
            let loss = sum_all_scaled(&out.losses, inv)?;
            return self.record("linear_cross_entropy", loss, &[], 0, |_| Ok(vec![]));
        }
        let want = (grads && h.requires_grad, grads && w.requires_grad);
        let (losses, dh, dw) = fused_rows(&h.value, &w.value, targets, weights, want, chunk)?;
        let loss = sum_all_scaled(&losses, inv)?;
        if !grads {
            return self.record("linear_cross_entropy", loss, &[], 0, |_| Ok(vec![]));
        }
        let saved = dh.iter().chain(&dw).map(Tensor::bytes).sum();
        self.record("linear_cross_entropy", loss, &[h, w], saved, move |dloss| {
            let dh = dh.map(|g| scale_by_upstream(&g, inv, dloss)).transpose()?;
            let dw = dw.map(|g| scale_by_upstream(&g, inv, dloss)).transpose()?;
            Ok(vec![dh, dw])
        })
    }

    /// Weighted mean cross-entropy of `logits` (N, V) against `targets` (N); a (1) loss.
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32], weights: &[f32]) -> Result<Var> {
        let inv = inverse_total("cross_entropy", weights)?;
        let out = cross_entropy(&logits.value, targets, weights)?;
        let loss = sum_all_scaled(&out.losses, inv)?;
        let (x, lse) = (logits.value.clone(), out.lse);
        let (t, w) = (targets.to_vec(), weights.to_vec());
        let saved = x.bytes() + lse.bytes();
        self.record("cross_entropy", loss, &[logits], saved, move |dloss| {
            // On the GPU, dloss is a (1) tensor that stays there (no host round trip), applied
            // by one more pass; on the CPU it is read directly and folded into the scale.
            let dx = match dloss.device() {
                Device::Cpu(_) => {
                    let d = dloss.to_vec()?[0];
                    cross_entropy_backward(&x, &t, &w, &lse, inv * d)?
                }
                Device::Gpu(_) => {
                    scale_by(&cross_entropy_backward(&x, &t, &w, &lse, inv)?, 1.0, dloss)?
                }
            };
            Ok(vec![Some(dx)])
        })
    }
}

#[cfg(test)]
mod tests {
    use tensor::testing::{assert_close_slices, gpu, gpu_with_binding_limit, random_vec};
    use tensor::{Device, Tensor};

    use crate::{Grads, Param, Tape};

    /// The loss and, where they are asked, dh and dW of the fused loss over `chunk` rows at a
    /// time, on `device`: h (n, c) and W (v, c) trainable or not, some weights 0.
    struct Run {
        loss: Vec<f32>,
        dh: Option<Vec<f32>>,
        dw: Option<Vec<f32>>,
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        device: &Device,
        (n, c, v): (usize, usize, usize),
        h_grad: bool,
        w_grad: bool,
        recording: bool,
        chunk: Option<usize>,
        seed: u64,
    ) -> Run {
        let param = |shape: &[usize], s: u64, trainable: bool| {
            let t = Tensor::from_vec(random_vec(shape.iter().product(), s), shape, device);
            let t = t.unwrap();
            match trainable {
                true => Param::trainable("x", t),
                false => Param::frozen("x", t),
            }
        };
        let (h, w) = (
            param(&[n, c], seed, h_grad),
            param(&[v, c], seed + 1, w_grad),
        );
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
        let weights: Vec<f32> = (0..n)
            .map(|i| {
                if i % 4 == 1 {
                    0.0
                } else {
                    0.5 + i as f32 / 8.0
                }
            })
            .collect();
        let tape = if recording {
            Tape::new()
        } else {
            Tape::inference()
        };
        let (hv, wv) = (tape.param(&h), tape.param(&w));
        let loss = match chunk {
            Some(r) => tape.linear_cross_entropy_chunked(&hv, &wv, &targets, &weights, r),
            None => tape.linear_cross_entropy(&hv, &wv, &targets, &weights),
        }
        .unwrap();
        let mut grads = Grads::new();
        if loss.requires_grad {
            tape.backward(&loss, &mut grads).unwrap();
        }
        let grad = |p: &Param| {
            p.as_trainable()
                .and_then(|t| grads.get(t.id))
                .map(|g| g.to_vec().unwrap())
        };
        Run {
            loss: loss.value.to_vec().unwrap(),
            dh: grad(&h),
            dw: grad(&w),
        }
    }

    fn assert_runs_close(what: &str, got: &Run, want: &Run, tol: f32) {
        assert_close_slices(&format!("{what} loss"), &got.loss, &want.loss, tol, tol);
        for (name, g, w) in [("dh", &got.dh, &want.dh), ("dW", &got.dw, &want.dw)] {
            assert_eq!(
                g.is_some(),
                w.is_some(),
                "{what} {name}: computed in one run only"
            );
            if let (Some(g), Some(w)) = (g, w) {
                assert_close_slices(&format!("{what} {name}"), g, w, tol, tol);
            }
        }
    }

    /// Every combination of what needs a gradient, for N a multiple of the chunk and not.
    const CASES: [(bool, bool, bool); 5] = [
        (true, true, true),
        (true, false, true),
        (false, true, true),
        (false, false, true),
        (true, true, false),
    ];

    #[test]
    fn chunked_matches_one_chunk_cpu() {
        let d = Device::cpu();
        for (n, chunk) in [(12, 4), (11, 4), (10, 3), (7, 1)] {
            for (h_grad, w_grad, recording) in CASES {
                let dims = (n, 9, 13);
                let what = format!("n {n} chunk {chunk} h {h_grad} W {w_grad} rec {recording}");
                let one = run(&d, dims, h_grad, w_grad, recording, Some(n), 3);
                let chunked = run(&d, dims, h_grad, w_grad, recording, Some(chunk), 3);
                assert_eq!(one.dh.is_some(), h_grad && recording, "{what}");
                assert_eq!(one.dw.is_some(), w_grad && recording, "{what}");
                // Losses and dh rows are the same sums; dW adds the chunks' products in turn.
                assert_runs_close(&what, &chunked, &one, 1e-6);
            }
        }
    }

    #[test]
    fn one_chunk_is_the_default_on_small_problems() {
        // The public op takes one chunk when the logits fit: the same bits as forcing one.
        let d = Device::cpu();
        let dims = (10, 9, 13);
        let default = run(&d, dims, true, true, true, None, 5);
        let one = run(&d, dims, true, true, true, Some(10), 5);
        assert_runs_close("default", &default, &one, 0.0);
    }

    #[test]
    fn chunked_matches_cpu_on_gpu() {
        let Some(g) = gpu() else { return };
        // Forced chunks, and chunks the binding limit sets: (4096 − alignment)/4 floats hold
        // 8 rows of 100 logits (a multiple of 4), so 21 rows take 3 chunks.
        let small = gpu_with_binding_limit(4096);
        for (n, chunk) in [(12, 4), (11, 4), (10, 3)] {
            for (h_grad, w_grad, recording) in CASES {
                let dims = (n, 9, 13);
                let what = format!("n {n} chunk {chunk} h {h_grad} W {w_grad} rec {recording}");
                let cpu = run(&Device::cpu(), dims, h_grad, w_grad, recording, Some(n), 7);
                let gpu = run(&g, dims, h_grad, w_grad, recording, Some(chunk), 7);
                assert_runs_close(&what, &gpu, &cpu, 1e-5);
            }
        }
        for (h_grad, w_grad) in [(true, true), (true, false), (false, true)] {
            let dims = (21, 6, 100);
            let cpu = run(&Device::cpu(), dims, h_grad, w_grad, true, None, 9);
            let gpu = run(&small, dims, h_grad, w_grad, true, None, 9);
            assert_runs_close(
                &format!("4 KiB bindings h {h_grad} W {w_grad}"),
                &gpu,
                &cpu,
                1e-5,
            );
        }
    }

    #[test]
    fn linear_cross_entropy_checks_shapes() {
        let d = Device::cpu();
        let tape = Tape::new();
        let z = |s: &[usize]| tape.constant(Tensor::zeros(s, &d).unwrap());
        let e = tape
            .linear_cross_entropy(&z(&[2, 3]), &z(&[5, 4]), &[0, 1], &[1.0, 1.0])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(V, C)") && e.contains("[2, 3]") && e.contains("[5, 4]"),
            "{e}"
        );
        let e = tape
            .linear_cross_entropy(&z(&[2, 3]), &z(&[5, 3]), &[0], &[1.0, 1.0])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 targets and 2 weights") && e.contains("1 targets"),
            "{e}"
        );
    }
}
