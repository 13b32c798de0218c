//! The gradient store: one buffer per trainable parameter that received a gradient, and
//! nothing for frozen ones. Backward accumulates into it (so micro-batches add up) until
//! [`Grads::zero`].
//!
//! Made by [`AdamW::grads`](crate::AdamW::grads) on a GPU, the store keeps the gradients in
//! the optimizer's gradient arena (see [`crate::arena`]): each first gradient is copied into its
//! parameter's slot, so the norm and the update can each cover all of them in one dispatch.

use std::collections::HashMap;
use std::sync::Arc;

use tensor::{Result, Tensor, ops::elementwise::axpy};

use crate::arena::Layout;
use crate::memory::Counter;
use crate::param::ParamId;

/// Gradients of trainable parameters, by id.
#[derive(Default)]
pub struct Grads {
    map: HashMap<ParamId, Tensor>,
    bytes: Counter,
    arena: Option<GradArena>,
}

/// The gradient arena: its layout (the optimizer's) and the buffer, made at the first gradient.
struct GradArena {
    layout: Arc<Layout>,
    flat: Option<Tensor>,
}

impl Grads {
    pub fn new() -> Grads {
        Grads::default()
    }

    /// A store whose gradients of the layout's parameters go into one gradient arena.
    pub(crate) fn in_arena(layout: Arc<Layout>) -> Grads {
        Grads {
            arena: Some(GradArena { layout, flat: None }),
            ..Grads::default()
        }
    }

    /// `grad[id] += g` (the first gradient is stored as it is, copied if someone else shares it,
    /// or copied into its slot of the gradient arena when the store has one).
    pub fn accumulate(&mut self, id: ParamId, g: Tensor) -> Result<()> {
        match self.map.get(&id) {
            Some(existing) => axpy(existing, 1.0, &g),
            None => {
                let g = match self.slot(id, &g)? {
                    Some(slot) => {
                        slot.copy_from(&g)?;
                        slot
                    }
                    None if g.is_exclusive() => g,
                    None => g.copy()?,
                };
                self.bytes.add(g.bytes());
                self.map.insert(id, g);
                Ok(())
            }
        }
    }

    /// The view of `id`'s slot in the gradient arena, shaped as `g`, when the store has an
    /// arena that holds `id` at `g`'s size on `g`'s device (the arena made at the first call).
    fn slot(&mut self, id: ParamId, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(arena) = &mut self.arena else {
            return Ok(None);
        };
        let layout = &arena.layout;
        let Some(slot) = layout.slot(id) else {
            return Ok(None);
        };
        if slot.numel() != g.numel() || !g.device().same(&layout.device) {
            return Ok(None);
        }
        let flat = match &arena.flat {
            Some(flat) => flat,
            None => {
                // Every element between slots must add nothing to the norm.
                let flat = if layout.gaps {
                    Tensor::zeros(&[layout.numel], &layout.device)?
                } else {
                    Tensor::uninit(&[layout.numel], &layout.device)?
                };
                arena.flat.insert(flat)
            }
        };
        Ok(Some(flat.view(slot.offset, g.shape())?))
    }

    /// The gradient arena and its layout, when every parameter of the layout has its gradient
    /// in its slot and the store holds no other gradient: then the arena is all the gradients.
    pub(crate) fn arena(&self) -> Option<(&Tensor, &Arc<Layout>)> {
        let arena = self.arena.as_ref()?;
        let flat = arena.flat.as_ref()?;
        let slots = &arena.layout.slots;
        let complete = self.map.len() == slots.len()
            && slots.iter().all(|s| {
                let g = self.map.get(&s.id);
                g.is_some_and(|g| g.offset_in(flat) == Some(s.offset))
            });
        complete.then_some((flat, &arena.layout))
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
        if let Some(arena) = &mut self.arena {
            arena.flat = None;
        }
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
