//! The CPU product with a weight stored in a compact form (NF4 codes, f16 halves): the weight's
//! stored rows are widened to f32 one panel at a time (about 64 Ki values, 256 KB: it stays in
//! cache while `sgemm` reads it), and each panel is multiplied into its part of the output. No
//! f32 copy of the whole weight ever exists.
//!
//! W is stored `(rows, cols)` row-major; X is `(M, K)`; Y is `(M, N)`:
//! - `trans_w = false`: W stored `(K, N)`, `Y = X·W`. Panel `W[r0..r1, :]` holds K rows, so it
//!   adds `X[:, r0..r1]·panel` to all of Y (the first panel writes Y, the others accumulate);
//! - `trans_w = true`: W stored `(N, K)`, `Y = X·Wᵀ`. Panel `W[r0..r1, :]` holds N rows, so it
//!   writes the columns `r0..r1` of Y: `Y[:, r0..r1] = X·panelᵀ`.

use crate::sgemm::{Mat, sgemm};
use crate::{Result, Tensor, shape_err};

/// `[M, K, N]` of `X·op(W)` for X `(M, K)` and W stored `stored = [rows, cols]` (`(K, N)`, or
/// `(N, K)` with `trans_w`), or an error for `op` naming both shapes.
pub(crate) fn dims(
    op: &'static str,
    x: &Tensor,
    stored: [usize; 2],
    trans_w: bool,
) -> Result<[usize; 3]> {
    let [k, n] = if trans_w {
        [stored[1], stored[0]]
    } else {
        stored
    };
    let &[m, xk] = x.shape() else {
        return shape_err(op, "X of 2 dims (M, K)", x.shape());
    };
    if xk != k {
        let form = if trans_w { "(N, K)" } else { "(K, N)" };
        return shape_err(
            op,
            format!("X (M, {k}) for W stored {form} = {stored:?}"),
            x.shape(),
        );
    }
    Ok([m, k, n])
}

/// Stored values per widened panel: 64 Ki (256 KB of f32).
const PANEL_VALUES: usize = 1 << 16;

/// `Y = X·op(W)` for W of `stored = [rows, cols]`, with `widen(e0, out)` writing W's stored
/// elements `e0..e0 + out.len()` (row-major) as f32 into `out`. Returns Y `(M, N)`.
pub(crate) fn product(
    x: &[f32],
    [m, k, n]: [usize; 3],
    [rows, cols]: [usize; 2],
    trans_w: bool,
    widen: impl Fn(usize, &mut [f32]),
) -> Vec<f32> {
    debug_assert_eq!(
        [rows, cols],
        if trans_w { [n, k] } else { [k, n] },
        "W's stored shape is op(W)'s"
    );
    let mut y = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let rows_per_panel = (PANEL_VALUES / cols.max(1)).max(1);
    let mut panel = vec![0.0f32; rows_per_panel * cols];
    for r0 in (0..rows).step_by(rows_per_panel) {
        let r1 = (r0 + rows_per_panel).min(rows);
        let panel = &mut panel[..(r1 - r0) * cols];
        widen(r0 * cols, panel);
        let pr = r1 - r0;
        // SAFETY: every pointer addresses a block inside its slice at the strides given: x is
        // (m, k) row-major, the panel (pr, cols), y (m, n); the products stay inside them.
        unsafe {
            if trans_w {
                // Panel = W[r0..r1, :] (N rows of length K): Y[:, r0..r1] = X · panelᵀ.
                sgemm(
                    m,
                    k,
                    pr,
                    1.0,
                    Mat {
                        ptr: x.as_ptr(),
                        rs: k,
                        cs: 1,
                    },
                    Mat {
                        ptr: panel.as_ptr(),
                        rs: 1,
                        cs: cols,
                    },
                    0.0,
                    Mat {
                        ptr: y.as_mut_ptr().add(r0),
                        rs: n,
                        cs: 1,
                    },
                    true,
                );
            } else {
                // Panel = W[r0..r1, :] (K rows of length N): Y += X[:, r0..r1] · panel.
                sgemm(
                    m,
                    pr,
                    n,
                    1.0,
                    Mat {
                        ptr: x.as_ptr().add(r0),
                        rs: k,
                        cs: 1,
                    },
                    Mat {
                        ptr: panel.as_ptr(),
                        rs: cols,
                        cs: 1,
                    },
                    if r0 == 0 { 0.0 } else { 1.0 },
                    Mat {
                        ptr: y.as_mut_ptr(),
                        rs: n,
                        cs: 1,
                    },
                    true,
                );
            }
        }
    }
    y
}
