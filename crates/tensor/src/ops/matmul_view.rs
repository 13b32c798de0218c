//! Matrix products over column blocks of wider tensors: [`MatView`], [`matmul_view`] and
//! [`matmul_into`].
//!
//! A [`MatView`] is a 2-D matrix stored row-major inside a tensor: the tensor seen as
//! `(rows, ld)`, `ld` its last dim and `rows` the product of the others, restricted to the
//! columns `col0..col0 + cols` and (with [`MatView::rows`]) to the rows `row0..row0 + rows`.
//! Element `(i, j)` of the view is element `(row0 + i)·ld + col0 + j` of the tensor, so the
//! products read and write it in place through the kernel's leading dimensions and offsets
//! (`lda/ldb/ldc`, `off_*`): no slice and no copy.
//!
//! ```text
//! matmul_view(A, B, opts, α)            = α·op(A)·op(B)                  → a new (M, N) tensor
//! matmul_into(C, A, B, opts, α, false):   C[:, cols] = α·op(A)·op(B)
//! matmul_into(C, A, B, opts, α, true):    C[:, cols] += α·op(A)·op(B)
//! ```
//! with `op` and the shapes as in [`matmul`](super::matmul): op(A) is (M, K), op(B) is (K, N),
//! the C view is (M, N). LoRA uses them to add `h·Bᵀ` into q's or v's columns of c_attn's
//! `(N, 3C)` output, and in backward to read `dy`'s column block for dB and dh; the chunked
//! fused loss (autograd's `linear_cross_entropy`) reads h's row blocks and writes dh's.
//!
//! Views are 2-D (no batch). Backward rules are [`matmul`](super::matmul)'s table, scaled by α.

use super::{Dims, MatmulOpts, run};
use crate::tensor::same_device;
use crate::{Error, Result, Tensor, shape_err};

/// The rows `row0..row0 + rows` and columns `col0..col0 + cols` of `tensor` seen as a
/// `(rows, ld)` matrix (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct MatView<'a> {
    pub tensor: &'a Tensor,
    pub col0: usize,
    pub cols: usize,
    pub row0: usize,
    /// `None`: every stored row from `row0` on.
    pub rows: Option<usize>,
}

impl<'a> MatView<'a> {
    /// All of `t`'s rows and columns.
    pub fn all(t: &'a Tensor) -> MatView<'a> {
        MatView::cols(t, 0, t.shape().last().copied().unwrap_or(1))
    }

    /// The columns `col0..col0 + cols` of `t` (all of its rows).
    pub fn cols(t: &'a Tensor, col0: usize, cols: usize) -> MatView<'a> {
        MatView {
            tensor: t,
            col0,
            cols,
            row0: 0,
            rows: None,
        }
    }

    /// The rows `row0..row0 + rows` of this view, counted from its own first row (a row block
    /// of a contiguous matrix, at element `row0·ld` of the tensor). The products check the
    /// block against the tensor's rows; keeping it inside an earlier row block is the caller's.
    pub fn rows(self, row0: usize, rows: usize) -> MatView<'a> {
        MatView {
            row0: self.row0 + row0,
            rows: Some(rows),
            ..self
        }
    }

    /// `(rows, cols, ld)` of the view, or an error naming `what` when its columns or rows do not
    /// fit.
    pub(super) fn layout(&self, op: &'static str, what: &str) -> Result<(usize, usize, usize)> {
        let shape = self.tensor.shape();
        if shape.is_empty() {
            return shape_err(op, format!("{what} of at least 1 dim"), shape);
        }
        let ld = self.tensor.last_dim();
        if self.col0 + self.cols > ld {
            return shape_err(
                op,
                format!(
                    "{what} with at least col0 + cols = {} + {} columns",
                    self.col0, self.cols
                ),
                shape,
            );
        }
        // The product of the leading dims: a tensor of no columns still has its rows.
        let stored: usize = shape[..shape.len() - 1].iter().product();
        let rows = self
            .rows
            .unwrap_or_else(|| stored.saturating_sub(self.row0));
        if self.row0 + rows > stored {
            return shape_err(
                op,
                format!(
                    "{what} with at least row0 + rows = {} + {rows} rows of {ld}",
                    self.row0
                ),
                shape,
            );
        }
        Ok((rows, self.cols, ld))
    }

    /// Element of the tensor where the view starts.
    pub(super) fn start(&self) -> usize {
        self.row0 * self.tensor.last_dim() + self.col0
    }
}

/// The product `c = α·op(a)·op(b)` of views, checked: the sizes, the leading dimensions and
/// the element offsets of the three operands.
pub(super) fn view_dims(
    op: &'static str,
    c: &MatView,
    a: &MatView,
    b: &MatView,
    o: MatmulOpts,
    alpha: f32,
) -> Result<Dims> {
    let (ra, ca, lda) = a.layout(op, "A")?;
    let (rb, cb, ldb) = b.layout(op, "B")?;
    let (rc, cc, ldc) = c.layout(op, "C")?;
    let (m, k) = if o.trans_a { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if o.trans_b { (cb, rb) } else { (rb, cb) };
    if kb != k {
        return Err(Error::Shape {
            op,
            expected: format!("op(B) with K = {k} rows to match op(A) ({m}, {k})"),
            found: format!("op(B) ({kb}, {n})"),
        });
    }
    if (rc, cc) != (m, n) {
        return Err(Error::Shape {
            op,
            expected: format!("a C view of ({m}, {n}) rows and columns"),
            found: format!("({rc}, {cc})"),
        });
    }
    let mut d = Dims {
        batch: 1,
        m,
        k,
        n,
        out_shape: vec![m, n],
        ld: [lda, ldb, ldc],
        // With K = 0, A and B are never read: no offset past an empty tensor's end.
        off: if k == 0 {
            [0, 0, c.start()]
        } else {
            [a.start(), b.start(), c.start()]
        },
        stride: [0; 3],
        alpha,
    };
    // One entry: the strides are never used; those of whole tensors, as `matmul` would pass.
    d.stride = d.dense(false);
    Ok(d)
}

/// `α·op(A)·op(B)` of two views, as a new `(M, N)` tensor (see the module doc).
pub fn matmul_view(a: MatView, b: MatView, opts: MatmulOpts, alpha: f32) -> Result<Tensor> {
    let (ra, ca, _) = a.layout("matmul_view", "A")?;
    let (rb, cb, _) = b.layout("matmul_view", "B")?;
    let m = if opts.trans_a { ca } else { ra };
    let n = if opts.trans_b { rb } else { cb };
    let device = same_device("matmul_view", &[a.tensor, b.tensor])?;
    let c = Tensor::uninit(&[m, n], &device)?;
    matmul_into(MatView::all(&c), a, b, opts, alpha, false)?;
    Ok(c)
}

/// In place: the C view `= α·op(A)·op(B)`, or `+=` with `accumulate` (see the module doc). The
/// columns of C's tensor outside the view are not touched. C must not share storage with A or B.
pub fn matmul_into(
    c: MatView,
    a: MatView,
    b: MatView,
    opts: MatmulOpts,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let _profile = crate::profile::scope("matmul");
    let op = "matmul_into";
    let d = view_dims(op, &c, &a, &b, opts, alpha)?;
    if c.tensor.same_storage(a.tensor) || c.tensor.same_storage(b.tensor) {
        return Err(Error::Invalid(format!(
            "{op}: C must not share storage with A or B"
        )));
    }
    let device = same_device(op, &[c.tensor, a.tensor, b.tensor])?;
    crate::counts::matmul(d.batch, d.m, d.n, d.k, opts.trans_a, opts.trans_b);
    run(
        &device, c.tensor, a.tensor, b.tensor, None, &d, opts, accumulate,
    )
}
