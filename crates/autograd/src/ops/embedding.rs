//! Embedding lookup: out[n] = table[ids[n]], table: (V, C), out: (N, C).
//! Backward: dtable[v] = Σ_{n: ids[n] = v} dout[n] (a deterministic scatter-add in
//! `tensor::ops::embedding`); the ids are the only thing saved.

use tensor::Result;
use tensor::ops::embedding::{embedding, embedding_backward};

use crate::tape::{Tape, Var};

impl Tape {
    /// Rows of `table` picked by `ids`.
    pub fn embedding(&self, table: &Var, ids: &[u32]) -> Result<Var> {
        let y = embedding(&table.value, ids)?;
        let ids = ids.to_vec();
        let vocab = table.shape()[0];
        self.record("embedding", y, &[table], 0, move |dy| {
            Ok(vec![Some(embedding_backward(&ids, dy, vocab)?)])
        })
    }
}
