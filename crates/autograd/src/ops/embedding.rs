//! Embedding lookup: `out[n] = table[ids[n]]`, table: (V, C), out: (N, C).
//! Backward: `dtable[v] = Σ_{n: ids[n] = v} dout[n]` (a deterministic scatter-add in
//! [`tensor::ops::embedding`]); the ids are the only thing saved.
//!
//! [`Tape::gather_rows`] is the same op with activations as the table: it keeps the rows of
//! an (N, C) activation that a later op needs, and its backward scatters dout back into them.

use tensor::Result;
use tensor::ops::embedding::{embedding, embedding_backward};

use crate::tape::{Tape, Var};

impl Tape {
    /// Rows of `table` picked by `ids`.
    pub fn embedding(&self, table: &Var, ids: &[u32]) -> Result<Var> {
        self.pick_rows("embedding", table, ids)
    }

    /// Rows `rows` of `x` (N, C), in that order: (rows.len(), C).
    pub fn gather_rows(&self, x: &Var, rows: &[u32]) -> Result<Var> {
        self.pick_rows("gather_rows", x, rows)
    }

    fn pick_rows(&self, op: &'static str, table: &Var, ids: &[u32]) -> Result<Var> {
        let y = embedding(&table.value, ids)?;
        let ids = ids.to_vec();
        let vocab = table.shape()[0];
        self.record(op, y, &[table], 0, move |dy| {
            Ok(vec![Some(embedding_backward(&ids, dy, vocab)?)])
        })
    }
}
