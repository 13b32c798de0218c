//! Serving: what runs inside a forward pass. Each Linear of the model carries a
//! [`BankAdapter`]; it turns the bank's routing into per-row adapter indices (once per batch
//! shape, shared by every layer) and adds the SGMV term of each of its sites to the base output.

use std::sync::{Arc, Mutex};

use autograd::{Param, Tape, Var};
use tensor::Tensor;
use tensor::ops::sgmv::{NO_ADAPTER, sgmv};
use transformer::model::Adapter;

use super::{Routing, Shared};
use crate::target::Module;

impl Shared {
    /// The per-row adapter indices for x: (B, T, in), or `None` when no row has an adapter.
    fn row_indices(&mut self, x: &Tensor) -> transformer::Result<Option<Tensor>> {
        let &[b, t, _] = x.shape() else {
            return Err(transformer::Error::Invalid(format!(
                "the adapter bank serves inputs of shape (B, T, C), not {:?}",
                x.shape()
            )));
        };
        if let Some((shape, idx)) = &self.rows
            && *shape == (b, t)
        {
            return Ok(idx.clone());
        }
        let index = |name: &Option<String>| match name {
            Some(n) => self
                .slots
                .iter()
                .position(|m| m.as_ref() == Some(n))
                .map_or(NO_ADAPTER, |i| i as u32),
            None => NO_ADAPTER,
        };
        let per_sequence: Vec<u32> = match &self.routing {
            Routing::All(name) => vec![index(name); b],
            Routing::PerSequence(names) if names.len() == b => names.iter().map(index).collect(),
            Routing::PerSequence(names) => {
                return Err(transformer::Error::Invalid(format!(
                    "the adapter bank routes {} sequences, but the batch has {b}",
                    names.len()
                )));
            }
        };
        let idx = if per_sequence.iter().all(|&i| i == NO_ADAPTER) {
            None
        } else {
            // Rows of sequence s are s·T..(s+1)·T.
            let rows: Vec<u32> = per_sequence
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, t))
                .collect();
            Some(Tensor::from_u32(&rows, &x.device())?)
        };
        self.rows = Some(((b, t), idx.clone()));
        Ok(idx)
    }
}

/// The bank's view from one Linear: adds the SGMV terms of that Linear's sites.
pub(super) struct BankAdapter {
    pub linear: (usize, Module),
    pub shared: Arc<Mutex<Shared>>,
}

impl Adapter for BankAdapter {
    fn apply(&self, tape: &Tape, x: &Var, mut y: Var) -> transformer::Result<Var> {
        let mut shared = self
            .shared
            .lock()
            .expect("no forward panicked while holding the bank");
        if !shared.linears.contains_key(&self.linear) {
            return Ok(y);
        }
        let Some(idx) = shared.row_indices(&x.value)? else {
            return Ok(y);
        };
        for site in &shared.linears[&self.linear] {
            // Forward only: the term is a constant of the tape, nothing flows back into A or B.
            let delta = tape.constant(sgmv(&x.value, &idx, &site.a, &site.b, &site.scales)?);
            y = if delta.shape() == y.shape() {
                tape.add(&y, &delta)?
            } else {
                tape.add_into_axis(&y, y.shape().len() - 1, site.col0, &delta)?
            };
        }
        Ok(y)
    }

    fn params(&self) -> Vec<&Param> {
        Vec::new() // nothing trains: the stacks are the bank's own, served as constants
    }
}
