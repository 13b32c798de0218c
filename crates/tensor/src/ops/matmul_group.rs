//! Grouped products: g independent products of one shape in one call, [`matmul_into_group`],
//! one dispatch on a GPU when the operands' layout allows it.
//!
//! # Math
//! For views `C_z, A_z, B_z` ([`MatView`]s), `z < g`, with op(A_z): (M, K), op(B_z): (K, N)
//! and C_z: (M, N), the same M, K, N for every z:
//!
//! ```text
//! C_z  = α·op(A_z)·op(B_z)          (accumulate = false)
//! C_z += α·op(A_z)·op(B_z)          (accumulate = true)
//! ```
//!
//! A slice of one view stands for that view repeated g times: an operand shared by the group
//! (LoRA's input x against q's and v's A). C views must be pairwise disjoint or identical;
//! products into one identical view are **summed** into it (the first writes it unless
//! `accumulate`, the others add): `dx = Σ_z dp_z·A_z` is one call. Backward rules are
//! [`matmul`](super::matmul)'s table per product, scaled by α.
//!
//! # One dispatch
//! The kernels address batch entry z of each operand at `off + z·stride` with a leading
//! dimension `ld` (`Params.off_*`, `stride_*`, `ld*` of `shaders/matmul.wgsl` and
//! `matmul_tiled.wgsl`), so on a GPU the group is one batched dispatch (per 65,535 products and
//! per binding's worth of them) when, for each operand,
//!
//! - the g views lie in one storage buffer (views of one tensor or of one arena: the position
//!   of a view is its tensor's element in that buffer, [`Tensor::arena`](crate::Tensor::arena),
//!   plus `col0`), with one leading dimension;
//! - from one view to the next the first element moves by one constant step, ≥ 0 for every
//!   operand (0: one view shared by all; the group is taken in reverse order when every step is
//!   ≤ 0): `stride = col0` difference for column blocks of one wide tensor (q's and v's
//!   columns of c_attn's output), the slot distance for parameters in AdamW's arena;
//! - the C views are disjoint (none identical: a sum cannot be one dispatch, its products would
//!   race on C's elements).
//!
//! Otherwise (the CPU; views in different buffers; irregular steps; a sum) the products run one
//! after the other as [`matmul_into`](super::matmul_into) would run them: the same numbers.
//! `stride` need not be M·N, and the C view may be a column block (`ldc ≠ N`): the first
//! kernel takes any layout; the tiled kernel takes it when every offset, leading dimension and
//! stride is a multiple of 4 (`matmul_tiled::tiled_fits`, checked per dispatch as for any
//! product), otherwise the first kernel runs it. A group whose range does not fit a binding is
//! cut into several batched dispatches, and one whose single product does not is split per
//! product, as a batched [`matmul`](super::matmul) is.
//!
//! [`group_outputs`] makes g fresh output tensors laid out for one dispatch: on a GPU, views of
//! one allocation at a stride of one tensor.
//!
//! Counted as one product of batch g ([`counts`](crate::counts)), however many dispatches.

use super::view::view_dims;
use super::{Dims, MatView, MatmulOpts, launch, run};
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor};

/// Where a view lies: the tensor owning its buffer, the element of its first element there,
/// its leading dimension, and its stored rows and columns.
struct Place {
    root: Tensor,
    start: usize,
    ld: usize,
    rows: usize,
    cols: usize,
}

impl Place {
    fn of(v: &MatView, rows: usize, ld: usize) -> Place {
        let (root, base) = v.tensor.arena_root();
        Place {
            root,
            start: base + v.start(),
            ld,
            rows,
            cols: v.cols,
        }
    }

    fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }

    /// Whether the two views are the same elements (same buffer, start and layout).
    fn same(&self, o: &Place) -> bool {
        self.root.same_storage(&o.root)
            && (self.start, self.ld, self.rows, self.cols) == (o.start, o.ld, o.rows, o.cols)
    }

    /// Whether the two views share an element.
    fn overlaps(&self, o: &Place) -> bool {
        if self.is_empty() || o.is_empty() || !self.root.same_storage(&o.root) {
            return false;
        }
        let span = |p: &Place| (p.start, p.start + (p.rows - 1) * p.ld + p.cols);
        let ((s0, e0), (s1, e1)) = (span(self), span(o));
        if e0 <= s1 || e1 <= s0 {
            return false;
        }
        if (self.ld, self.rows, self.cols) != (o.ld, o.rows, o.cols) {
            return true; // intersecting ranges of different layouts: taken as overlapping
        }
        // Element (i, j) of one is element (i', j') of the other when the starts differ by
        // δ = di·ld + dj with 0 ≤ di < rows and |dj| < cols.
        let (delta, ld) = (s0.abs_diff(s1), self.ld.max(1));
        let (di, rem) = (delta / ld, delta % ld);
        (di < self.rows && rem < self.cols) || (di + 1 < self.rows && ld - rem < self.cols)
    }
}

/// The view of product z in a slice of g views or of one shared view.
fn at<'a>(views: &[MatView<'a>], z: usize) -> MatView<'a> {
    views[if views.len() == 1 { 0 } else { z }]
}

/// `C_z (+)= α·op(A_z)·op(B_z)` for every z (see the module doc): g = the longest slice, the
/// others of length g or 1 (one view shared by the group). Every product must have the same
/// (M, K, N); C views must be pairwise disjoint or identical (identical ones take the sum of
/// their products), and must not share a storage buffer with any A or B view.
pub fn matmul_into_group(
    c: &[MatView],
    a: &[MatView],
    b: &[MatView],
    opts: MatmulOpts,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let _profile = crate::profile::scope("matmul");
    let op = "matmul_into_group";
    let g = c.len().max(a.len()).max(b.len());
    for (what, len) in [("C", c.len()), ("A", a.len()), ("B", b.len())] {
        if len != 1 && len != g {
            return Err(Error::Shape {
                op,
                expected: format!("1 or g = {g} {what} views"),
                found: format!("{len}"),
            });
        }
    }
    if g == 0 {
        return Ok(());
    }
    let product = |z: usize| view_dims(op, &at(c, z), &at(a, z), &at(b, z), opts, alpha);
    let first = product(0)?;
    for z in 1..g {
        let d = product(z)?;
        if (d.m, d.k, d.n) != (first.m, first.k, first.n) {
            return Err(Error::Shape {
                op,
                expected: format!(
                    "product {z} of the group's (M, K, N) = ({}, {}, {})",
                    first.m, first.k, first.n
                ),
                found: format!("({}, {}, {})", d.m, d.k, d.n),
            });
        }
    }
    let tensors: Vec<&Tensor> = [c, a, b]
        .iter()
        .flat_map(|s| s.iter())
        .map(|v| v.tensor)
        .collect();
    let device = same_device(op, &tensors)?;
    let places = |views: &[MatView], which: usize| -> Result<Vec<Place>> {
        views
            .iter()
            .map(|v| {
                let (rows, _, ld) = v.layout(op, ["A", "B", "C"][which])?;
                Ok(Place::of(v, rows, ld))
            })
            .collect()
    };
    let (pa, pb, pc) = (places(a, 0)?, places(b, 1)?, places(c, 2)?);
    if pc
        .iter()
        .any(|p| pa.iter().chain(&pb).any(|q| p.root.same_storage(&q.root)))
    {
        return Err(Error::Invalid(format!(
            "{op}: C must not share storage with A or B (found a C view in the buffer of an \
             A or B view)"
        )));
    }
    // For each product, whether an earlier product writes the same C view (its sum).
    let mut summed = vec![false; g];
    for z in 0..pc.len() {
        for y in 0..z {
            if pc[y].same(&pc[z]) {
                summed[z] = true;
                break;
            }
            if pc[y].overlaps(&pc[z]) {
                return Err(Error::Invalid(format!(
                    "{op}: C views must be disjoint or identical, found views {y} and {z} \
                     partly overlapping"
                )));
            }
        }
    }
    if c.len() == 1 {
        summed[1..].fill(true);
    }
    crate::counts::matmul(g, first.m, first.n, first.k, opts.trans_a, opts.trans_b);
    if let Device::Gpu(ctx) = &device
        && !summed.contains(&true)
        && let Some((d, z0)) = regular(&first, [&pa, &pb, &pc], g, product)
    {
        let max_z = ctx.limits.max_compute_workgroups_per_dimension as usize;
        let (cz, az, bz) = (at(c, z0), at(a, z0), at(b, z0));
        return launch(
            ctx, cz.tensor, az.tensor, bz.tensor, None, &d, opts, accumulate, max_z, None,
        );
    }
    for (z, &sum) in summed.iter().enumerate() {
        let (cz, az, bz) = (at(c, z), at(a, z), at(b, z));
        let d = product(z)?;
        run(
            &device,
            cz.tensor,
            az.tensor,
            bz.tensor,
            None,
            &d,
            opts,
            accumulate || sum,
        )?;
    }
    Ok(())
}

/// The group as one batched product: its [`Dims`] (offsets in the tensors of product `z0`,
/// the first in memory, and the steps to the next) and `z0`; `None` when some operand's views
/// are in different buffers, of different leading dimensions, or not at one step ≥ 0 (or one
/// ≤ 0 for all operands: then the group runs from its last product, `z0 = g − 1`).
fn regular(
    first: &Dims,
    places: [&[Place]; 3],
    g: usize,
    product: impl Fn(usize) -> Result<Dims>,
) -> Option<(Dims, usize)> {
    let mut steps = [0i64; 3];
    for (i, p) in places.iter().enumerate() {
        let p0 = &p[0];
        if p.len() == 1 {
            continue;
        }
        let step = p[1].start as i64 - p0.start as i64;
        let fits = p.iter().enumerate().all(|(z, q)| {
            q.root.same_storage(&p0.root)
                && q.ld == p0.ld
                && q.start as i64 == p0.start as i64 + z as i64 * step
        });
        if !fits {
            return None;
        }
        steps[i] = step;
    }
    let z0 = if steps.iter().all(|&s| s >= 0) {
        0
    } else if steps.iter().all(|&s| s <= 0) {
        g - 1
    } else {
        return None;
    };
    let stride = steps.map(|s| usize::try_from(s.unsigned_abs()).unwrap_or(usize::MAX));
    if stride.iter().any(|&s| s > u32::MAX as usize) {
        return None;
    }
    let d0 = product(z0).ok()?;
    let mut d = Dims {
        batch: g,
        stride,
        ..d0
    };
    if first.k == 0 {
        // A and B are never read (their offsets are 0, as for one empty product).
        d.stride[0] = 0;
        d.stride[1] = 0;
    }
    Some((d, z0))
}

/// `g` fresh tensors of `shape` on `device`, laid out for one grouped dispatch: on a GPU,
/// consecutive views of one allocation (product z's at element z·numel); on the CPU,
/// separate tensors. Their contents are unspecified until written.
pub fn group_outputs(g: usize, shape: &[usize], device: &Device) -> Result<Vec<Tensor>> {
    match device {
        Device::Gpu(_) if g > 1 => {
            let numel = crate::tensor::checked_numel(shape)?;
            let mut whole_shape = vec![g];
            whole_shape.extend(shape);
            let whole = Tensor::uninit(&whole_shape, device)?;
            (0..g).map(|z| whole.view(z * numel, shape)).collect()
        }
        _ => (0..g).map(|_| Tensor::uninit(shape, device)).collect(),
    }
}

#[cfg(test)]
#[path = "matmul_group_tests.rs"]
mod tests;
