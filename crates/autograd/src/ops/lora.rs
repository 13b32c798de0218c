//! A LoRA update added straight into a column block of a base output, on the tape.
//!
//! Shapes: x (…, in) with N = ∏… rows; A (r, in); B (w, r); y (…, W) the base output (for
//! c_attn, W = 3C and the block is q's `[0, C)` or v's `[2C, 3C)`; for a whole Linear,
//! col0 = 0 and w = W). Forward, in two matrix products and no copy:
//! ```text
//! h = s·(x·Aᵀ)                                   (N, r)   one matmul, α = s
//! out = y;  out[:, col0..col0+w] += h·Bᵀ        (N, W)   one matmul accumulating into the block
//! ```
//! `out` is y's own storage when y is not shared (the usual case: the base matmul's fresh
//! output, moved in); otherwise y is copied first. The scale goes on h, (N, r), rather than on
//! the (N, w) product: the same numbers (s·(x·Aᵀ)·Bᵀ = (s·x·Aᵀ)·Bᵀ), fewer multiplications.
//!
//! Backward, for d = dout (N, W) and its block d_w = d[:, col0..col0+w] (read in place through
//! a strided view, never sliced out):
//! ```text
//! dy = d                         (the base's gradient, passed on unchanged)
//! dB = d_wᵀ·h                    (w, r)   h saved
//! dh = d_w·B,  dp = s·dh         (N, r)   the gradient reaching p = x·Aᵀ; one matmul, α = s
//! dA = dpᵀ·x                     (r, in)  x saved when A is trainable
//! dx = dp·A                      (N, in)  A saved when x needs a gradient
//! ```
//! dx is added straight into x's gradient summed so far when the tape offers it (the other
//! adapter's, or the base product's, see [`Pending`](crate::Pending)): no separate addition.
//! Saved: h (N·r floats), x (already alive as the base's input) and the small A, B: the same
//! as the unfused path (matmul, scale, matmul, add-into) saved.
//!
//! # Several updates of one output: [`Tape::lora_group`]
//! GPT-2's c_attn carries q's and v's updates, z ∈ {q, v}, each the math above with its own
//! A_z, B_z, col0_z and the same x and s. [`Tape::lora_group`] runs the g parts' products as
//! grouped products ([`matmul_into_group`]): each of the six is one call, and one dispatch on a
//! GPU when its operands lie at a regular step in one buffer (AdamW's arena holds the A's, and
//! the B's, at one slot distance; the column blocks of y and d are col0 apart; x is shared):
//! ```text
//! h = [h_1 | … | h_g]                (N, g·r)  h_z = s·x·A_zᵀ: one grouped product
//! out[:, col0_z..col0_z+w] += h_z·B_zᵀ          one grouped product
//! dB_z = d_zᵀ·h_z                    (g, w, r) one grouped product (views of one tensor)
//! dp = [dp_1 | … | dp_g]             (N, g·r)  dp_z = s·d_z·B_z: one grouped product
//! dA_z = dp_zᵀ·x                     (g, r, in) one grouped product
//! dx (+)= Σ_z dp_z·A_z                          one grouped sum (g accumulating dispatches)
//! ```
//! 12 products of 2 parts become 6 calls, 7 dispatches (9 where dA and dB, K = N rows, take the
//! GPU's split-K path, two passes each: `tensor`'s `matmul_splitk.rs`). The parts' column
//! blocks must be disjoint or identical (identical ones add up); parts of different shapes, or
//! partly overlapping blocks, run [`Tape::lora_into`] part by part: the same numbers.

use tensor::ops::matmul::{
    MatView, MatmulOpts, group_outputs, matmul, matmul_accumulate, matmul_into, matmul_into_group,
    matmul_scaled, matmul_view,
};
use tensor::{Error, Result, Tensor};

use crate::saved::saved_bytes;
use crate::tape::{Tape, Var, bytes_of};

/// `x·Mᵀ` for a weight M stored (rows, cols), as PEFT stores A and B.
const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// (…, C) viewed as (∏…, C), sharing storage.
fn rows2d(t: &Tensor) -> Result<Tensor> {
    let c = t.last_dim();
    t.reshape(&[t.numel().checked_div(c).unwrap_or(0), c])
}

/// `(r, in, w)` of one update, checked against x and y: A (r, in), B (w, r), x (…, in), y
/// (…, W) with x's leading dims and at least col0 + w columns.
fn check_part(
    op: &'static str,
    y: &Var,
    x: &Var,
    a: &Var,
    b: &Var,
    col0: usize,
) -> Result<[usize; 3]> {
    let (&[r, n_in], &[w, _]) = (a.shape(), b.shape()) else {
        return Err(Error::Shape {
            op,
            expected: "A (r, in) and B (w, r), 2-D".into(),
            found: format!("A {:?}, B {:?}", a.shape(), b.shape()),
        });
    };
    let lead = &x.shape()[..x.shape().len().saturating_sub(1)];
    let y_lead = &y.shape()[..y.shape().len().saturating_sub(1)];
    if x.value.last_dim() != n_in || b.shape() != [w, r] || lead != y_lead {
        return Err(Error::Shape {
            op,
            expected: format!(
                "x (…, {n_in}) and y with x's leading dims, A (r, in) = {:?}, B (w, r)",
                a.shape()
            ),
            found: format!("x {:?}, B {:?}, y {:?}", x.shape(), b.shape(), y.shape()),
        });
    }
    if col0 + w > y.value.last_dim() {
        return Err(Error::Shape {
            op,
            expected: format!("y with at least col0 + w = {col0} + {w} columns"),
            found: format!("{:?}", y.shape()),
        });
    }
    Ok([r, n_in, w])
}

/// `y` itself when nothing else holds its storage (written in place), a copy otherwise.
fn writable(y: &Var) -> Result<Tensor> {
    if y.value.is_exclusive() {
        Ok(y.value.clone())
    } else {
        y.value.copy()
    }
}

impl Tape {
    /// `y` with `s·(x·Aᵀ)·Bᵀ` added into its columns `col0..col0 + w` (see the module doc).
    /// x: (…, in), A: (r, in), B: (w, r), y: (…, W) with the leading dims of x. y is taken by
    /// value: its storage becomes the output's when nothing else holds it.
    pub fn lora_into(
        &self,
        y: Var,
        x: &Var,
        a: &Var,
        b: &Var,
        scale: f32,
        col0: usize,
    ) -> Result<Var> {
        let op = "lora_into";
        let [_, _, w] = check_part(op, &y, x, a, b, col0)?;
        let h = rows2d(&matmul_scaled(&x.value, &a.value, None, TRANS_B, scale)?)?;
        let out = writable(&y)?;
        let out2d = rows2d(&out)?;
        matmul_into(
            MatView::cols(&out2d, col0, w),
            MatView::all(&h),
            MatView::all(&b.value),
            TRANS_B,
            1.0,
            true,
        )?;
        drop(out2d);
        let (ny, nx, na, nb) = (
            y.requires_grad,
            x.requires_grad,
            a.requires_grad,
            b.requires_grad,
        );
        let need_dp = nx || na;
        let x_saved = match na {
            true => Some(self.save_activation(&x.value, &[x, a])?),
            false => None,
        };
        let a_saved = nx.then(|| a.value.clone());
        let b_saved = need_dp.then(|| b.value.clone());
        let h_saved = nb.then_some(h);
        let saved = saved_bytes([x_saved.as_ref()])
            + bytes_of([a_saved.as_ref(), b_saved.as_ref(), h_saved.as_ref()]);
        let x_shape = x.shape().to_vec();
        let counter = self.matmul_counter();
        self.record_accumulating(op, out, &[&y, x, a, b], saved, move |d, pending| {
            let d2 = rows2d(d)?;
            let dw = MatView::cols(&d2, col0, w);
            let trans_a = MatmulOpts {
                trans_a: true,
                trans_b: false,
            };
            let bump = || counter.set(counter.get() + 1);
            let db = match &h_saved {
                Some(h) => {
                    bump();
                    Some(matmul_view(dw, MatView::all(h), trans_a, 1.0)?)
                }
                None => None,
            };
            let dp = match &b_saved {
                Some(bv) => {
                    bump();
                    Some(matmul_view(
                        dw,
                        MatView::all(bv),
                        MatmulOpts::default(),
                        scale,
                    )?)
                }
                None => None,
            };
            let da = match (&dp, &x_saved) {
                (Some(dp), Some(xv)) => {
                    bump();
                    Some(matmul(dp, &rows2d(&xv.get()?)?, None, trans_a)?)
                }
                _ => None,
            };
            let dx = match (&dp, &a_saved) {
                (Some(dp), Some(av)) => {
                    bump();
                    // Into x's gradient summed so far (the other adapter's, the base's) when
                    // the tape offers it; a fresh one otherwise.
                    match pending.take(1) {
                        Some(acc) => {
                            let plain = MatmulOpts::default();
                            matmul_accumulate(&rows2d(&acc)?, dp, av, plain)?;
                            Some(acc)
                        }
                        None => {
                            Some(matmul(dp, av, None, MatmulOpts::default())?.reshape(&x_shape)?)
                        }
                    }
                }
                _ => None,
            };
            Ok(vec![ny.then(|| d.clone()), dx, da, db])
        })
    }
}

impl Tape {
    /// `y` with every part's update added into its columns: for each `(A_z, B_z, col0_z)` of
    /// `parts`, `out[:, col0_z..col0_z + w] += s·(x·A_zᵀ)·B_zᵀ`, the parts' products grouped (see
    /// the module doc). Shapes as [`Tape::lora_into`]'s, the same for every part; column blocks
    /// disjoint or identical. Otherwise, and for one part, [`Tape::lora_into`] part by part.
    pub fn lora_group(
        &self,
        y: Var,
        x: &Var,
        parts: &[(&Var, &Var, usize)],
        scale: f32,
    ) -> Result<Var> {
        let op = "lora_group";
        let mut dims = Vec::with_capacity(parts.len());
        for &(a, b, col0) in parts {
            dims.push(check_part(op, &y, x, a, b, col0)?);
        }
        // Column blocks disjoint or identical (then their updates add up).
        let w0 = dims.first().map_or(0, |d| d[2]);
        let blocks_ok = parts.iter().enumerate().all(|(i, p)| {
            parts[..i]
                .iter()
                .all(|q| p.2 == q.2 || p.2 + w0 <= q.2 || q.2 + w0 <= p.2)
        });
        if parts.len() < 2 || dims.iter().any(|d| *d != dims[0]) || !blocks_ok {
            let mut y = y;
            for &(a, b, col0) in parts {
                y = self.lora_into(y, x, a, b, scale, col0)?;
            }
            return Ok(y);
        }
        let (g, [r, n_in, w]) = (parts.len(), dims[0]);
        let device = x.value.device();
        let x2 = rows2d(&x.value)?;
        let rows = x2.shape()[0];
        let col0s: Vec<usize> = parts.iter().map(|p| p.2).collect();
        // h = [h_1 | … | h_g], h_z = s·x·A_zᵀ; then out's column blocks += h_z·B_zᵀ.
        let h = Tensor::uninit(&[rows, g * r], &device)?;
        let h_views: Vec<MatView> = (0..g).map(|z| MatView::cols(&h, z * r, r)).collect();
        let a_views: Vec<MatView> = parts.iter().map(|p| MatView::all(&p.0.value)).collect();
        let b_views: Vec<MatView> = parts.iter().map(|p| MatView::all(&p.1.value)).collect();
        matmul_into_group(
            &h_views,
            &[MatView::all(&x2)],
            &a_views,
            TRANS_B,
            scale,
            false,
        )?;
        let out = writable(&y)?;
        let out2d = rows2d(&out)?;
        let y_views: Vec<MatView> = col0s.iter().map(|&c| MatView::cols(&out2d, c, w)).collect();
        matmul_into_group(&y_views, &h_views, &b_views, TRANS_B, 1.0, true)?;
        drop((h_views, a_views, b_views, y_views));
        drop(out2d);
        let (ny, nx) = (y.requires_grad, x.requires_grad);
        let na = parts.iter().any(|p| p.0.requires_grad);
        let nb = parts.iter().any(|p| p.1.requires_grad);
        let wants: Vec<(bool, bool)> = parts
            .iter()
            .map(|p| (p.0.requires_grad, p.1.requires_grad))
            .collect();
        let need_dp = nx || na;
        let x_saved = match na {
            true => {
                let mut inputs = vec![x];
                inputs.extend(parts.iter().map(|p| p.0));
                Some(self.save_activation(&x2, &inputs)?)
            }
            false => None,
        };
        drop(x2);
        let a_saved: Vec<Tensor> = if nx {
            parts.iter().map(|p| p.0.value.clone()).collect()
        } else {
            Vec::new()
        };
        let b_saved: Vec<Tensor> = if need_dp {
            parts.iter().map(|p| p.1.value.clone()).collect()
        } else {
            Vec::new()
        };
        let h_saved = nb.then_some(h);
        let saved = saved_bytes([x_saved.as_ref()])
            + bytes_of(
                [h_saved.as_ref()]
                    .into_iter()
                    .chain(a_saved.iter().chain(&b_saved).map(Some)),
            );
        let x_shape = x.shape().to_vec();
        let counter = self.matmul_counter();
        let mut inputs: Vec<&Var> = vec![&y, x];
        for p in parts {
            inputs.extend([p.0, p.1]);
        }
        self.record_accumulating(op, out, &inputs, saved, move |d, pending| {
            let d2 = rows2d(d)?;
            let device = d.device();
            let d_views: Vec<MatView> = col0s.iter().map(|&c| MatView::cols(&d2, c, w)).collect();
            let trans_a = MatmulOpts {
                trans_a: true,
                trans_b: false,
            };
            let plain = MatmulOpts::default();
            let bump = || counter.set(counter.get() + 1);
            // dB_z = d_zᵀ·h_z.
            let db = match &h_saved {
                Some(h) => {
                    bump();
                    let db = group_outputs(g, &[w, r], &device)?;
                    let c: Vec<MatView> = db.iter().map(MatView::all).collect();
                    let hv: Vec<MatView> = (0..g).map(|z| MatView::cols(h, z * r, r)).collect();
                    matmul_into_group(&c, &d_views, &hv, trans_a, 1.0, false)?;
                    drop(c);
                    Some(db)
                }
                None => None,
            };
            // dp = [dp_1 | … | dp_g], dp_z = s·d_z·B_z.
            let dp = if b_saved.is_empty() {
                None
            } else {
                bump();
                let dp = Tensor::uninit(&[rows, g * r], &device)?;
                let c: Vec<MatView> = (0..g).map(|z| MatView::cols(&dp, z * r, r)).collect();
                let bv: Vec<MatView> = b_saved.iter().map(MatView::all).collect();
                matmul_into_group(&c, &d_views, &bv, plain, scale, false)?;
                drop(c);
                Some(dp)
            };
            let dp_views: Vec<MatView> = match &dp {
                Some(dp) => (0..g).map(|z| MatView::cols(dp, z * r, r)).collect(),
                None => Vec::new(),
            };
            // dA_z = dp_zᵀ·x.
            let da = match &x_saved {
                Some(xv) if !dp_views.is_empty() => {
                    bump();
                    let xv = xv.get()?;
                    let da = group_outputs(g, &[r, n_in], &device)?;
                    let c: Vec<MatView> = da.iter().map(MatView::all).collect();
                    matmul_into_group(&c, &dp_views, &[MatView::all(&xv)], trans_a, 1.0, false)?;
                    drop(c);
                    Some(da)
                }
                _ => None,
            };
            // dx (+)= Σ_z dp_z·A_z, into x's gradient summed so far when the tape offers it.
            let dx = if a_saved.is_empty() || dp_views.is_empty() {
                None
            } else {
                bump();
                let av: Vec<MatView> = a_saved.iter().map(MatView::all).collect();
                let (acc, accumulate) = match pending.take(1) {
                    Some(acc) => (acc, true),
                    None => (Tensor::uninit(&x_shape, &device)?, false),
                };
                let acc2 = rows2d(&acc)?;
                matmul_into_group(
                    &[MatView::all(&acc2)],
                    &dp_views,
                    &av,
                    plain,
                    1.0,
                    accumulate,
                )?;
                drop(acc2);
                Some(acc)
            };
            drop(dp_views);
            let mut grads = vec![ny.then(|| d.clone()), dx];
            let mut da = da.map(Vec::into_iter);
            let mut db = db.map(Vec::into_iter);
            for &(wa, wb) in &wants {
                let ga = da.as_mut().and_then(Iterator::next);
                let gb = db.as_mut().and_then(Iterator::next);
                grads.push(ga.filter(|_| wa));
                grads.push(gb.filter(|_| wb));
            }
            Ok(grads)
        })
    }
}

#[cfg(test)]
mod tests {
    use tensor::testing::random_vec;
    use tensor::{Device, Tensor};

    use crate::{Grads, Param, Tape};

    /// q's and v's updates as one group and as two `lora_into`: on the CPU both run the same
    /// products one by one, so output and gradients agree to the bit, but for x's, whose two
    /// shares are added in the other order (the group adds q's first, the tape the last
    /// node's); the group is one node.
    #[test]
    fn a_group_is_two_lora_intos_in_one_node() {
        let cpu = Device::cpu();
        let (rows, c, r) = (5, 6, 2);
        let shapes = [[rows, 3 * c], [rows, c], [r, c], [c, r], [r, c], [c, r]];
        let run = |grouped: bool| {
            let params: Vec<Param> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let v = random_vec(s[0] * s[1], i as u64);
                    Param::trainable("p", Tensor::from_vec(v, s, &cpu).unwrap())
                })
                .collect();
            let tape = Tape::new();
            let v: Vec<_> = params.iter().map(|p| tape.param(p)).collect();
            let y = tape.scale(&v[0], 1.0).unwrap();
            let out = if grouped {
                let parts = [(&v[2], &v[3], 0), (&v[4], &v[5], 2 * c)];
                tape.lora_group(y, &v[1], &parts, 0.5).unwrap()
            } else {
                let u = tape.lora_into(y, &v[1], &v[2], &v[3], 0.5, 0).unwrap();
                tape.lora_into(u, &v[1], &v[4], &v[5], 0.5, 2 * c).unwrap()
            };
            let nodes = tape.len();
            let loss = tape.sum_all(&tape.mul(&out, &out).unwrap()).unwrap();
            let mut grads = Grads::new();
            tape.backward(&loss, &mut grads).unwrap();
            let g: Vec<Vec<f32>> = params
                .iter()
                .map(|p| {
                    grads
                        .get(p.as_trainable().unwrap().id)
                        .unwrap()
                        .to_vec()
                        .unwrap()
                })
                .collect();
            (out.value.to_vec().unwrap(), g, nodes)
        };
        let (grouped, looped) = (run(true), run(false));
        assert_eq!(grouped.0, looped.0);
        for (i, (g, l)) in grouped.1.iter().zip(&looped.1).enumerate() {
            if i == 1 {
                tensor::testing::assert_close_slices("dx", g, l, 1e-6, 1e-6);
            } else {
                assert_eq!(g, l, "gradient of input {i}");
            }
        }
        assert_eq!((grouped.2, looped.2), (2, 3));
    }

    #[test]
    fn a_shared_y_is_copied_not_written() {
        let cpu = Device::cpu();
        let tape = Tape::new();
        let t = |v: Vec<f32>, s: &[usize]| tape.constant(Tensor::from_vec(v, s, &cpu).unwrap());
        let y0 = t(vec![1.0; 6], &[2, 3]);
        let (x, a, b) = (
            t(vec![1.0, 2.0], &[2, 1]),
            t(vec![3.0], &[1, 1]),
            t(vec![0.5], &[1, 1]),
        );
        // y0 is still held here, so the op must work on a copy: out[i, 1] = 1 + 2·(3·x_i)·0.5.
        let out = tape.lora_into(y0.clone(), &x, &a, &b, 2.0, 1).unwrap();
        assert_eq!(y0.value.to_vec().unwrap(), vec![1.0; 6]);
        assert_eq!(out.value.to_vec().unwrap(), [1.0, 4.0, 1.0, 1.0, 7.0, 1.0]);
        // A y nothing else holds is written in place: the same numbers.
        let fresh = t(vec![1.0; 6], &[2, 3]);
        let out = tape.lora_into(fresh, &x, &a, &b, 2.0, 1).unwrap();
        assert_eq!(out.value.to_vec().unwrap(), [1.0, 4.0, 1.0, 1.0, 7.0, 1.0]);
        // Columns past y's width are an error naming them.
        let e = tape
            .lora_into(y0, &x, &a, &b, 2.0, 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("col0 + w = 3 + 1") && e.contains("[2, 3]"),
            "{e}"
        );
    }
}
