//! The gradient store: one buffer per trainable parameter that received a gradient, and
//! nothing for frozen ones. Backward accumulates into it (so micro-batches add up) until
//! [`Grads::zero`].

use std::collections::HashMap;

use tensor::{Result, Tensor, ops::elementwise::axpy};

use crate::memory::Counter;
use crate::param::ParamId;

/// Gradients of trainable parameters, by id.
#[derive(Default)]
pub struct Grads {
    map: HashMap<ParamId, Tensor>,
    bytes: Counter,
}

impl Grads {
    pub fn new() -> Grads {
        Grads::default()
    }

    /// `grad[id] += g` (the first gradient is stored as it is, copied if someone else shares it).
    pub fn accumulate(&mut self, id: ParamId, g: Tensor) -> Result<()> {
        match self.map.get(&id) {
            Some(existing) => axpy(existing, 1.0, &g),
            None => {
                let g = if g.is_exclusive() { g } else { g.copy()? };
                self.bytes.add(g.bytes());
                self.map.insert(id, g);
                Ok(())
            }
        }
    }

    /// Replace a gradient (clipping writes scaled gradients back this way).
    pub fn set(&mut self, id: ParamId, g: Tensor) {
        let new = g.bytes();
        if let Some(old) = self.map.insert(id, g) {
            self.bytes.sub(old.bytes());
        }
        self.bytes.add(new);
    }

    pub fn get(&self, id: ParamId) -> Option<&Tensor> {
        self.map.get(&id)
    }

    /// Ids that hold a gradient.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> + '_ {
        self.map.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Drop every gradient (the buffers go back to the device's pool).
    pub fn zero(&mut self) {
        self.map.clear();
        self.bytes.sub(self.bytes.live);
    }

    /// Live and peak bytes of gradient buffers.
    pub fn memory(&self) -> Counter {
        self.bytes
    }

    /// Start a new peak measurement.
    pub fn reset_peak(&mut self) {
        self.bytes.reset_peak();
    }
}
