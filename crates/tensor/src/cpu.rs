//! Helpers of the CPU backend: splitting work over the machine's threads.
//!
//! The ops' CPU references are written as plain loops over rows; `for_rows` runs such a loop on
//! all cores when the work is large enough to pay for starting threads (a few µs each).

use std::sync::OnceLock;

/// Threads the CPU backend uses (`std::thread::available_parallelism`).
pub fn threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Below this many output elements an op runs on one thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Call `f(row_index, row)` for each `row_len`-element row of `out`, on several threads when
/// `out` is large.
pub fn for_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
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
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                    f(c * per + i, row);
                }
            });
        }
    });
}

/// Call `f(index, &mut x)` for every element of `out`, on several threads when it is large.
pub fn for_each(out: &mut [f32], f: impl Fn(usize, &mut f32) + Sync) {
    let chunk = out.len().div_ceil(threads()).max(1);
    for_rows(out, chunk.min(out.len().max(1)), |r, row| {
        for (j, x) in row.iter_mut().enumerate() {
            f(r * chunk + j, x);
        }
    });
}
