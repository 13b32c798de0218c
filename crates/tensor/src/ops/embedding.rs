//! Token embedding: `embedding` (a gather of table rows) and `embedding_backward` (its
//! scatter-add).
//!
//! Math, with table: (V, C), ids: N token ids, each < V:
//! - forward:  `out[n, :] = table[ids[n], :]`, out: (N, C);
//! - backward: `dtable[v, :] = Σ_{n : ids[n] = v} dout[n, :]`, dtable: (V, C); rows of tokens
//!   that never occur are zero. The sum runs in ascending n, on both devices, so the GPU result
//!   equals the CPU one bit for bit.
//!
//! WGSL has no float atomics, so the backward cannot let every position add into its row. The
//! launcher builds on the host, from the ids, a per-token CSR index (the distinct tokens, and for
//! each the ascending list of its positions); one workgroup per distinct token sums its positions'
//! rows of dout in order and owns its row of dtable. The forward uses the same index (one
//! workgroup per token copies its row to each of its positions).
//!
//! The table may exceed one storage binding (GPT-2: 50,257 × 768 f32 = 154 MB, lavapipe binds at
//! most 128 MiB), and so may out/dout: the work is cut into rows of out/dout times vocabulary
//! ranges of table/dtable that each fit one binding, and each dispatch handles only the ids of
//! its ranges (one index *segment*).
//!
//! Kernel: `shaders/embedding.wgsl`.

use std::sync::Arc;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `embedding.wgsl`.
    struct Params {
        tokens: u32,
        cols: u32,
        v0: u32,
        off_tokens: u32,
        off_offsets: u32,
        off_positions: u32,
        off_rows: u32,
        off_table: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "embedding",
        source: shaders::EMBEDDING,
        entry,
    }
}

/// `Err(Error::Invalid)` naming the first id ≥ `vocab`, its position and `vocab`.
pub(crate) fn check_ids(op: &str, what: &str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(n) => Err(Error::Invalid(format!(
            "{op}: {what} {} at position {n} is out of range for a vocabulary of {vocab}",
            ids[n]
        ))),
        None => Ok(()),
    }
}

/// One dispatch's share of the index: rows `rows.0..+rows.1` of out/dout, vocabulary rows
/// `vocab.0..+vocab.1` of table/dtable, and where its CSR lies in the `TokenIndex` arrays.
struct Segment {
    rows: (usize, usize),
    vocab: (usize, usize),
    tokens: (usize, usize),
    offsets: usize,
    positions: (usize, usize),
}

/// Per-token CSR index of the ids, cut into segments (see `shaders/embedding.wgsl`).
#[derive(Default)]
struct TokenIndex {
    tokens: Vec<u32>,
    /// Per segment: `tokens + 1` offsets into its positions, starting at 0.
    offsets: Vec<u32>,
    /// Positions relative to the segment's first row.
    positions: Vec<u32>,
    segments: Vec<Segment>,
}

/// Sort the positions of each row chunk by token (stable, so ascending within a token) and cut
/// them by vocabulary chunk. Every id must be < the end of the last vocabulary chunk.
fn build_index(
    ids: &[u32],
    row_chunks: &[(usize, usize)],
    vocab_chunks: &[(usize, usize)],
) -> TokenIndex {
    let mut ix = TokenIndex::default();
    for &(n0, nl) in row_chunks {
        let mut order: Vec<u32> = (n0 as u32..(n0 + nl) as u32).collect();
        order.sort_by_key(|&n| ids[n as usize]);
        let id = |i: usize| ids[order[i] as usize];
        let mut i = 0;
        for &(v0, vl) in vocab_chunks {
            let (tok0, off0, pos0) = (ix.tokens.len(), ix.offsets.len(), ix.positions.len());
            while i < order.len() && (id(i) as usize) < v0 + vl {
                let token = id(i);
                ix.tokens.push(token);
                ix.offsets.push((ix.positions.len() - pos0) as u32);
                while i < order.len() && id(i) == token {
                    ix.positions.push(order[i] - n0 as u32);
                    i += 1;
                }
            }
            if ix.tokens.len() > tok0 {
                ix.offsets.push((ix.positions.len() - pos0) as u32);
                ix.segments.push(Segment {
                    rows: (n0, nl),
                    vocab: (v0, vl),
                    tokens: (tok0, ix.tokens.len() - tok0),
                    offsets: off0,
                    positions: (pos0, ix.positions.len() - pos0),
                });
            }
        }
    }
    ix
}

/// Run `entry` over every segment. `rows` is out (forward) or dout (backward), `table` is table
/// (forward) or dtable (backward), both with `cols` columns.
fn launch(
    ctx: &Arc<GpuContext>,
    forward: bool,
    ids: &[u32],
    rows: &Tensor,
    table: &Tensor,
    cols: usize,
) -> Result<()> {
    let vocab = table.numel() / cols;
    let row_chunks = ctx.row_chunks(ids.len(), &[cols, 1])?;
    let vocab_chunks = ctx.row_chunks(vocab, &[cols])?;
    let ix = build_index(ids, &row_chunks, &vocab_chunks);
    if ix.segments.is_empty() {
        return Ok(());
    }
    let device = Device::Gpu(ctx.clone());
    let tokens = Tensor::from_u32(&ix.tokens, &device)?;
    let offsets = Tensor::from_u32(&ix.offsets, &device)?;
    let positions = Tensor::from_u32(&ix.positions, &device)?;
    let (entry, table_no, rows_no) = match forward {
        true => ("embedding_forward", 4, 5),
        false => ("embedding_backward", 7, 6),
    };
    for s in &ix.segments {
        let t = ctx.view(&tokens, s.tokens.0, s.tokens.1)?;
        let o = ctx.view(&offsets, s.offsets, s.tokens.1 + 1)?;
        let p = ctx.view(&positions, s.positions.0, s.positions.1)?;
        let r = ctx.view(rows, s.rows.0 * cols, s.rows.1 * cols)?;
        let tb = ctx.view(table, s.vocab.0 * cols, s.vocab.1 * cols)?;
        let params = Params {
            tokens: s.tokens.1 as u32,
            cols: cols as u32,
            v0: s.vocab.0 as u32,
            off_tokens: t.offset,
            off_offsets: o.offset,
            off_positions: p.offset,
            off_rows: r.offset,
            off_table: tb.offset,
        };
        let bindings = [
            (1, t.binding),
            (2, o.binding),
            (3, p.binding),
            (table_no, tb.binding),
            (rows_no, r.binding),
        ];
        let groups = grid_2d(
            s.tokens.1,
            1,
            ctx.limits.max_compute_workgroups_per_dimension,
        );
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(())
}

/// `out[n] = table[ids[n]]`: table (V, C), ids N values < V (host slice), out (N, C).
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let _profile = crate::profile::scope("embedding");
    let &[vocab, cols] = table.shape() else {
        return shape_err("embedding", "a table of shape (V, C)", table.shape());
    };
    check_ids("embedding", "id", ids, vocab)?;
    let n = ids.len();
    match table.device() {
        Device::Cpu(ctx) => {
            let t = table.cpu_data()?;
            let mut out = vec![0.0; n * cols];
            crate::cpu::for_rows(&mut out, cols, |i, row| {
                let v = ids[i] as usize;
                row.copy_from_slice(&t[v * cols..(v + 1) * cols]);
            });
            Ok(Tensor::cpu_from(&ctx, out, &[n, cols]))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, &[n, cols])?;
            if out.numel() > 0 {
                launch(&ctx, true, ids, &out, table, cols)?;
            }
            Ok(out)
        }
    }
}

/// `dtable[v] = Σ_{n : ids[n] = v} dout[n]`: ids N values < `vocab`, dout (…, C) with N rows
/// (the product of its leading axes), dtable (vocab, C) on dout's device. Deterministic: each
/// row is summed in ascending n.
pub fn embedding_backward(ids: &[u32], dout: &Tensor, vocab: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("embedding");
    let cols = dout.last_dim();
    let n = ids.len();
    if dout.shape().len() < 2 || dout.numel() != n * cols {
        return shape_err(
            "embedding_backward",
            format!("dout of shape (N, C) with N = {n} rows, one per id"),
            dout.shape(),
        );
    }
    check_ids("embedding_backward", "id", ids, vocab)?;
    let dtable = Tensor::zeros(&[vocab, cols], &dout.device())?;
    match dout.device() {
        Device::Cpu(_) => {
            let d = dout.cpu_data()?;
            let mut dt = dtable.cpu_data_mut()?;
            for (i, &v) in ids.iter().enumerate() {
                let (v, src) = (v as usize, &d[i * cols..(i + 1) * cols]);
                dt[v * cols..(v + 1) * cols]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(a, b)| *a += b);
            }
        }
        Device::Gpu(ctx) => {
            if dtable.numel() > 0 && n > 0 {
                launch(&ctx, false, ids, dout, &dtable, cols)?;
            }
        }
    }
    Ok(dtable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{
        assert_close, assert_close_slices, gpu, gpu_with_binding_limit, random, sizes,
    };
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// N ids drawn from a random pool of the vocabulary: repeats, and (usually) tokens that
    /// never occur.
    fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let pool: Vec<u32> = (0..rng.random_range(1..=vocab))
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        (0..n)
            .map(|_| pool[rng.random_range(0..pool.len())])
            .collect()
    }

    fn check_both(g: &Device, n: usize, vocab: usize, cols: usize, ids: &[u32], seed: u64) {
        let table = random(&[vocab, cols], seed, &Device::cpu());
        let want = embedding(&table, ids).unwrap();
        let got = embedding(&table.to_device(g).unwrap(), ids).unwrap();
        // Exact: a copy.
        assert_close("embedding", &got, &want, 0.0, 0.0);
        let dout = random(&[n, cols], seed + 1, &Device::cpu());
        let want = embedding_backward(ids, &dout, vocab).unwrap();
        let got = embedding_backward(ids, &dout.to_device(g).unwrap(), vocab).unwrap();
        // Exact: both devices add the same f32 values in the same (ascending n) order.
        assert_close("embedding_backward", &got, &want, 0.0, 0.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn embedding_matches_cpu_random(n in sizes(), vocab in sizes(), cols in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let ids = random_ids(n, vocab, seed);
            check_both(&g, n, vocab, cols, &ids, seed);
        }

        #[test]
        fn embedding_cpu_matches_reference(n in sizes(), vocab in sizes(), cols in sizes(), seed in 0u64..1000) {
            let cpu = Device::cpu();
            let ids = random_ids(n, vocab, seed);
            let table = random(&[vocab, cols], seed, &cpu);
            let t = reference::widen(&table.to_vec().unwrap());
            let want = reference::narrow(&reference::embedding(&t, &ids, cols));
            assert_close_slices("embedding", &embedding(&table, &ids).unwrap().to_vec().unwrap(), &want, 0.0, 0.0);
            let dout = random(&[n, cols], seed + 1, &cpu);
            let got = embedding_backward(&ids, &dout, vocab).unwrap().to_vec().unwrap();
            // f32 sums of at most 257 values in [-1, 1) against f64: |err| ≤ 257 · 2⁻²⁴ · 257 ≈ 4e-3
            // in the worst case; typical errors are ~1e-6.
            let want = reference::embedding_backward(&ids, &reference::widen(&dout.to_vec().unwrap()), vocab, cols);
            assert_close_slices("embedding_backward", &got, &reference::narrow(&want), 1e-4, 1e-5);
        }
    }

    #[test]
    fn embedding_matches_cpu_hand_worked() {
        let cpu = Device::cpu();
        let table = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2], &cpu).unwrap();
        let out = embedding(&table, &[2, 0, 2]).unwrap();
        assert_eq!(out.shape(), [3, 2]);
        assert_eq!(out.to_vec().unwrap(), [5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
        let dout =
            Tensor::from_vec(vec![1.0, 10.0, 100.0, 1000.0, 0.5, 0.25], &[3, 2], &cpu).unwrap();
        let dt = embedding_backward(&[2, 0, 2], &dout, 4).unwrap();
        assert_eq!(dt.shape(), [4, 2]);
        assert_eq!(
            dt.to_vec().unwrap(),
            [100.0, 1000.0, 0.0, 0.0, 1.5, 10.25, 0.0, 0.0]
        );
        let Some(g) = gpu() else { return };
        check_both(&g, 3, 3, 2, &[2, 0, 2], 5);
        check_both(&g, 0, 3, 2, &[], 5);
    }

    #[test]
    fn embedding_matches_cpu_split_bindings() {
        // Bindings of at most 4 KiB: the 300 × 13 table (15.6 KB) is cut into vocabulary ranges
        // and the 257 × 13 out/dout (13.4 KB) into row ranges; a token's rows of dout then lie in
        // several ranges and are accumulated over several dispatches.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        let ids = random_ids(257, 300, 3);
        check_both(&g, 257, 300, 13, &ids, 3);
        let ids: Vec<u32> = (0..257).map(|n| [299, 0, 150][n % 3]).collect();
        check_both(&g, 257, 300, 13, &ids, 4);
    }

    #[test]
    fn embedding_matches_cpu_many_tokens() {
        // 70,000 distinct tokens: more workgroups than one grid dimension holds (65,535).
        let Some(g) = gpu() else { return };
        let ids: Vec<u32> = (0..70_000u32).map(|n| (n * 7_919) % 70_000).collect();
        check_both(&g, 70_000, 70_000, 2, &ids, 6);
    }

    #[test]
    fn embedding_rejects_bad_inputs() {
        let cpu = Device::cpu();
        let table = Tensor::zeros(&[5, 3], &cpu).unwrap();
        let e = embedding(&table, &[0, 4, 5, 1]).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("id 5") && e.contains("position 2") && e.contains("vocabulary of 5"),
            "{e}"
        );
        let dout = Tensor::zeros(&[2, 3], &cpu).unwrap();
        let e = embedding_backward(&[1, 7], &dout, 5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("id 7") && e.contains("position 1") && e.contains("vocabulary of 5"),
            "{e}"
        );
        let e = embedding_backward(&[1, 2, 3], &dout, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("N = 3") && e.contains("[2, 3]"), "{e}");
        let e = embedding(&Tensor::zeros(&[15], &cpu).unwrap(), &[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(V, C)") && e.contains("[15]"), "{e}");
        if let Some(g) = gpu() {
            let e = embedding(&table.to_device(&g).unwrap(), &[9])
                .unwrap_err()
                .to_string();
            assert!(e.contains("id 9") && e.contains("position 0"), "{e}");
        }
    }
}
