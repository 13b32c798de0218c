//! Helpers of the CPU backend: splitting work over the machine's threads.
//!
//! The ops' CPU paths work row by row (each row vectorised with [`fastmath`](crate::fastmath)
//! where it pays); [`for_rows`] runs such a per-row function on all cores when the work is large
//! enough to pay for handing it to another thread. The threads are rayon's pool, started once and
//! shared with the CPU product ([`sgemm`](crate::sgemm)), so an op costs a wake-up (a few µs),
//! not a thread start, and the product and the ops never compete with a second pool. The plain
//! loops the CPU path is checked against are in [`reference`](crate::reference).

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Threads the CPU backend uses (`std::thread::available_parallelism`; rayon's pool has as many
/// unless `RAYON_NUM_THREADS` says otherwise).
pub fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Below this many output elements an op runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Call `f(row_index, row)` for each `row_len`-element row of `out` (the last one shorter when
/// `row_len` does not divide its length), on several threads when `out` is large.
pub fn for_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let t = threads();
    if t == 1 || out.len() < PARALLEL_MIN || rows < 2 {
        for (i, row) in out.chunks_mut(row_len).enumerate() {
            f(i, row);
        }
        return;
    }
    let per = rows.div_ceil(t);
    rayon::in_place_scope(|s| {
        for (c, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move |_| {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * per + i, row);
                }
            });
        }
    });
}

/// A new vector of `n` values written row by row by `f(row_index, row)` as [`for_rows`] calls
/// it, without the zero-fill a `vec![0.0; n]` costs (a pass over memory the op then overwrites).
///
/// # Safety
/// `f` must write every element of each row it is given (the kernels here write their row
/// through one `zip` with inputs at least as long, `row.write(..)` element for element).
pub(crate) unsafe fn collect_rows(
    n: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    for_rows(&mut v.spare_capacity_mut()[..n], row_len.max(1), f);
    // SAFETY: for_rows handed every element of the first n to f, which wrote each (the
    // caller's promise).
    unsafe { v.set_len(n) };
    v
}

/// Rows of about 1/threads of `n` elements each: the row length [`collect_rows`] and
/// [`for_rows`] take for an elementwise op, so each thread gets one contiguous slice.
pub(crate) fn even_rows(n: usize) -> usize {
    n.div_ceil(threads()).max(1)
}

/// Call `f(index, &mut x)` for every element of `out`, on several threads when it is large.
pub fn for_each(out: &mut [f32], f: impl Fn(usize, &mut f32) + Sync) {
    let chunk = even_rows(out.len());
    for_rows(out, chunk, |r, row| {
        for (j, x) in row.iter_mut().enumerate() {
            f(r * chunk + j, x);
        }
    });
}

/// Call `f(row_index, a_row, b_row)` for the rows of two outputs that have the same number of
/// rows (`a_len` and `b_len` elements each), on several threads when `a` is large.
pub fn for_row_pairs(
    a: &mut [f32],
    a_len: usize,
    b: &mut [f32],
    b_len: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if a_len == 0 || b_len == 0 {
        return;
    }
    let rows = (a.len() / a_len).min(b.len() / b_len);
    let t = threads();
    let per = if t == 1 || a.len() < PARALLEL_MIN || rows < 2 {
        rows.max(1)
    } else {
        rows.div_ceil(t)
    };
    let chunks = a.chunks_mut(per * a_len).zip(b.chunks_mut(per * b_len));
    let run = |c: usize, (ca, cb): (&mut [f32], &mut [f32])| {
        for (i, (ra, rb)) in ca.chunks_mut(a_len).zip(cb.chunks_mut(b_len)).enumerate() {
            f(c * per + i, ra, rb);
        }
    };
    if per >= rows {
        chunks.enumerate().for_each(|(c, ab)| run(c, ab));
        return;
    }
    rayon::in_place_scope(|s| {
        for (c, ab) in chunks.enumerate() {
            let run = &run;
            s.spawn(move |_| run(c, ab));
        }
    });
}

/// `f(0), f(1), …, f(n − 1)` in order, computed on several threads when the `n` units of about
/// `work_per_unit` operations each are enough work: thread k takes units k, k + threads, …, so
/// units whose cost grows with their index still share out evenly.
pub fn map_units<R: Send>(n: usize, work_per_unit: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let t = threads().min(n);
    if t <= 1 || n.saturating_mul(work_per_unit) < PARALLEL_MIN {
        return (0..n).map(f).collect();
    }
    let mut parts: Vec<Vec<(usize, R)>> = (0..t)
        .into_par_iter()
        .map(|k| (k..n).step_by(t).map(|u| (u, f(u))).collect::<Vec<_>>())
        .collect();
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for (u, r) in parts.iter_mut().flat_map(std::mem::take) {
        out[u] = Some(r);
    }
    out.into_iter()
        .map(|r| r.expect("every unit was computed"))
        .collect()
}
